"""User-facing errors: one readable line that names the file and the fix."""


class CxrlensError(Exception):
    """An error caused by user input (a file, a name, an option), not by a bug.

    The CLI prints ``str(error)`` as one line and exits with status 2; the web server turns it
    into a 4xx response. The message names the offending file or value and says how to fix it.
    """
