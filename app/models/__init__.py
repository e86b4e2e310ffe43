"""The daemon's model side, with nothing of HTTP: the model manager (load on first
use, keep_alive, leases, idle unload), the link to kvcached's broker, and the typed
event hub the tray, dashboard and control API follow."""
