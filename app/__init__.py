"""app: what people touch: the daemon's HTTP endpoint, the tray, the dashboard, the CLI, settings."""
