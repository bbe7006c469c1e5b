"""The languages the text tools support, and the one place that checks a language code."""

from lmforge.errors import LmforgeError

# Languages for which both bundled data sets exist: simplemma (lemmas) and stop-words (stop lists).
# Spelled out rather than read from the libraries' internals so an upstream refactor cannot silently
# change what we accept; tests check every code here really works in both libraries.
SUPPORTED_LANGUAGES: tuple[str, ...] = (
    "ar", "bg", "ca", "cs", "da", "de", "el", "en", "es", "fa", "fi", "fr", "he", "hi",
    "hu", "id", "it", "ms", "nb", "nl", "pl", "pt", "ro", "ru", "sk", "sv", "tr", "uk",
)  # fmt: skip


def check_language(lang: str) -> str:
    """Return the normalised ISO 639-1 code, or raise a one-line LmforgeError naming what is supported."""
    code = lang.strip().lower() if isinstance(lang, str) else ""
    if code not in SUPPORTED_LANGUAGES:
        raise LmforgeError(f"unknown language {lang!r}; supported: {', '.join(SUPPORTED_LANGUAGES)}")
    return code
