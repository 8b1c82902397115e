"""megadiff.model"""
