"""
Example plugin package
"""
