"""Every environment variable Ebbtide reads, declared in one place (as Ollama's envconfig)."""

HOME = "EBBTIDE_HOME"            # redirect config/data/logs/runtime under one folder
HOST = "EBBTIDE_HOST"            # bind address of the daemon
PORT = "EBBTIDE_PORT"            # port of the daemon
BACKEND = "EBBTIDE_BACKEND"      # kvcached backend: auto | cuda | host
DEFAULT_MODEL = "EBBTIDE_MODEL"  # model served when a client names none
LOG_LEVEL = "EBBTIDE_LOG_LEVEL"  # DEBUG, INFO, WARNING...

ALL = (HOME, HOST, PORT, BACKEND, DEFAULT_MODEL, LOG_LEVEL)
