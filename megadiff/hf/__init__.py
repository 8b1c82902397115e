"""megadiff.hf"""
