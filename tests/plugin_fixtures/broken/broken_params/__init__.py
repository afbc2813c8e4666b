"""broken_params: a test plugin for kinod's end-to-end tests."""
