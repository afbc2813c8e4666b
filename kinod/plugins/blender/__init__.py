"""The blender plugin: frame ranges rendered with Blender's command line."""
