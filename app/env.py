"""Every environment variable Ebbtide reads, declared in one place (as Ollama's envconfig)."""

HOME = "EBBTIDE_HOME"            # redirect config/data/logs/runtime under one folder
HOST = "EBBTIDE_HOST"            # bind address of the daemon
PORT = "EBBTIDE_PORT"            # port of the daemon
BACKEND = "EBBTIDE_BACKEND"      # kvcached backend: auto | cuda | host
DEFAULT_MODEL = "EBBTIDE_MODEL"  # model served when a client names none
LOG_LEVEL = "EBBTIDE_LOG_LEVEL"  # DEBUG, INFO, WARNING...
KEEP_ALIVE = "EBBTIDE_KEEP_ALIVE"  # default idle unload: 300, "5m", "-1"
HEADROOM = "EBBTIDE_HEADROOM"    # memory kept free for other apps: "1GiB"
AUTO_YIELD = "EBBTIDE_AUTO_YIELD"  # true | false
MODELS = "EBBTIDE_MODELS"        # extra model folders, comma separated
ORIGINS = "EBBTIDE_ORIGINS"      # extra allowed browser origins, comma separated
CONFIG = "EBBTIDE_CONFIG"        # settings file to read instead of the default one
SUPERVISOR = "EBBTIDE_SUPERVISOR_PID"  # set by the tray for the daemon it starts (it holds the lock)

ALL = (HOME, HOST, PORT, BACKEND, DEFAULT_MODEL, LOG_LEVEL, KEEP_ALIVE, HEADROOM, AUTO_YIELD,
       MODELS, ORIGINS, CONFIG, SUPERVISOR)
