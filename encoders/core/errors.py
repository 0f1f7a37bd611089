"""The closed list of per-row error codes written to ``<output>_error`` as ``code: message``."""

from __future__ import annotations

ERROR_CODES: dict[str, str] = {
    "empty_text": "the text is empty or whitespace only",
    "bad_type": "the value is not of a type this modality accepts",
    "decode_failed": "bytes could not be decoded (invalid UTF-8, corrupt image or audio)",
    "missing_file": "a referenced file does not exist",
    "too_large": "the input exceeds a configured size limit",
    "too_short": "the input is shorter than the model can use",
    "encode_failed": "the model raised on this row alone (after isolating it from its batch)",
    "prepare_failed": "preparing this row (decode, tokenize, resample) raised alone, not as a known bad input",
}


def error_value(code: str, message: str) -> str:
    if code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code!r}; valid codes: {', '.join(ERROR_CODES)}")
    return f"{code}: {message}"


def error_code(value: str) -> str:
    """The code part of an error value."""
    return value.split(":", 1)[0]
