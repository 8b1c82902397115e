"""megadiff.parallel"""
