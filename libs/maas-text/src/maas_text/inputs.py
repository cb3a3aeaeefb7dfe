"""Validation of the texts a request carries, before any tokenizer sees them.

Decisions (documented for callers):
- Texts arrive as bytes (KServe BYTES) or str; bytes must be UTF-8, else INVALID_ARGUMENT
  naming the input and the item (`text[3]`).
- An empty or whitespace-only text is refused (INVALID_ARGUMENT, reason EMPTY_TEXT): its
  "embedding" would be the pooled special tokens only, the same vector for every empty input,
  which silently poisons a similarity search. Callers filter them out.
- A batch of more than `max_batch` texts is refused (INVALID_ARGUMENT, reason BATCH_TOO_LARGE)
  naming the limit; callers split it. An empty batch is refused too.
- Texts longer than the model's limit are not an error: they are truncated and flagged.
"""

from __future__ import annotations

from collections.abc import Sequence

from maas_runtime.errors import FieldViolation, InvalidArgument

# The most texts one request may carry: the served model's max_batch_size, and a bound on
# the padded [batch, 256] tensors one call allocates.
DEFAULT_MAX_BATCH = 256


def decode_texts(
    values: Sequence[bytes | str],
    *,
    input_name: str = "text",
    max_batch: int = DEFAULT_MAX_BATCH,
) -> list[str]:
    """Decode and check `values`; InvalidArgument naming `input_name[i]` for each bad item."""
    if not values:
        raise InvalidArgument.for_field(input_name, "no texts given", reason="EMPTY_BATCH")
    if len(values) > max_batch:
        raise InvalidArgument.for_field(
            input_name,
            f"{len(values)} texts in one request; the limit is {max_batch} (split the batch)",
            reason="BATCH_TOO_LARGE",
            metadata={"limit": str(max_batch)},
        )
    texts: list[str] = []
    violations: list[FieldViolation] = []
    for index, value in enumerate(values):
        field_path = f"{input_name}[{index}]"
        if isinstance(value, bytes | bytearray | memoryview):
            try:
                text = bytes(value).decode("utf-8")
            except UnicodeDecodeError as error:
                bad_byte = bytes(value)[error.start : error.start + 1]
                violations.append(
                    FieldViolation(field_path, f"not valid UTF-8 (byte {error.start}: {bad_byte!r})")
                )
                continue
        elif isinstance(value, str):
            text = value
        else:
            violations.append(FieldViolation(field_path, f"expected text, got {type(value).__name__}"))
            continue
        if not text.strip():
            violations.append(FieldViolation(field_path, "empty text; nothing to embed"))
            continue
        texts.append(text)
    if violations:
        reasons = {"empty" if "empty" in v.description else "utf8" for v in violations}
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        raise InvalidArgument(
            f"invalid texts: {summary}",
            field_violations=violations,
            reason="EMPTY_TEXT" if reasons == {"empty"} else "TEXT_INVALID",
        )
    return texts
