"""broken_import: a test plugin for kinod's end-to-end tests."""
