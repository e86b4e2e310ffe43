"""The exit codes of `ebbtide` and of the daemon it runs (`ebbtide serve` returns the daemon's
own code): one set, one meaning each, so scripts can tell failures apart."""

OK = 0
ERROR = 1             # something failed; the message says what
USAGE = 2             # bad arguments (argparse uses 2 too)
NOT_RUNNING = 3       # no daemon answers at the endpoint
ALREADY_RUNNING = 4   # another instance holds the lock
NOT_FOUND = 5         # no such model
CONFIG = 6            # the daemon: the settings refuse to start it (e.g. an off-loopback bind)
BIND = 7              # the daemon: it could not listen on host:port (in use?)
