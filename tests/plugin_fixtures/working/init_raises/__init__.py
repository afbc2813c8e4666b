"""init_raises: a test plugin for kinod's end-to-end tests."""
