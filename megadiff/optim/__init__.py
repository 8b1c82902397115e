"""megadiff.optim"""
