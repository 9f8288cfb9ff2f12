"""Exceptions that the CLI turns into a one-line message and a non-zero exit."""


class MoequantError(Exception):
    """A user-facing error: bad input, missing package, wrong checksum, unsupported model. The message
    names the file, tensor or option at fault; the CLI prints it as one line and exits 2."""


class UnrepresentableError(MoequantError, ValueError):
    """Finite data a codec cannot store as asked (a scale that overflows its dtype). A ``ValueError`` for
    library callers of the codec math; the solver adds the tensor's name for the CLI's one-line error."""


def one_line(e: BaseException) -> str:
    """``e``'s message on one line (messages quoted from other libraries may span several)."""
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
