"""megadiff.training"""
