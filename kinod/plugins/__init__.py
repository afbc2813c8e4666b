"""Built-in generator plugins and the plugin contract (base_plugin, plugin_loader)."""
