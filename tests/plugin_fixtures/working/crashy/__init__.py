"""crashy: a test plugin that ends its own process, for kinod's process isolation tests."""
