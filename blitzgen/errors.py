"""The one exception type for user mistakes.

A BlitzgenError carries a single line that names the bad value and what was expected;
the CLI prints it without a traceback and the server turns it into a 4xx JSON body.
Invariants of our own code use `assert`, never this.
"""


class BlitzgenError(Exception):
    pass
