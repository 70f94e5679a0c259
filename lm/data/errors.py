"""The one exception the data layer raises for anything a user can fix."""


class DataError(ValueError):
    """A problem with a corpus, a tokenizer or a token store.

    Every message is one line: what is wrong, then how to fix it.
    """


def prepare_hint(out, source=None, tokenizer=None) -> str:
    """The command that rebuilds a store, so error messages can end with a fix."""
    if source is None or tokenizer is None:
        return f"re-run `attnlab data prepare` for {out} with --overwrite"
    sources = " ".join(source) if isinstance(source, (list, tuple)) else source
    return f"re-run `attnlab data prepare --source {sources} --tokenizer {tokenizer} --out {out} --overwrite`"
