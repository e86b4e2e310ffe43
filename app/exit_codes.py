"""The `ebbtide` command's exit codes: one meaning each, so scripts can tell failures apart."""

OK = 0
ERROR = 1             # something failed; the message says what
USAGE = 2             # bad arguments (argparse uses 2 too)
NOT_RUNNING = 3       # no daemon answers at the endpoint
ALREADY_RUNNING = 4   # another instance holds the lock
NOT_FOUND = 5         # no such model
