"""megadiff.data"""
