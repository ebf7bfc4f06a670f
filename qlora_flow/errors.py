"""Which failures a retry can fix, and the one line a person reads for each expected one.

Prefect retries a task only when `is_retryable` says so: a bad config, a missing file, an unknown
model or rejected credentials fail the same way every time, so retrying them only delays the
error (an unknown hub id retried for 172 s). Network hiccups and server errors stay retryable.
Kept free of heavy imports: the CLI loads it before torch, boto3 or Prefect.
"""

from __future__ import annotations

from collections.abc import Iterator

# S3 error codes that mean "fix the credentials, bucket or permissions", never "try again"
PERMANENT_S3_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidBucketName",
        "InvalidClientTokenId",
        "InvalidToken",
        "NoSuchBucket",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
        "403",
        "Forbidden",
    }
)
CREDENTIAL_S3_CODES = frozenset(
    {
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidClientTokenId",
        "InvalidToken",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
    }
)
# A missing or unreadable local file stays missing; a hub lookup that found nothing (hub errors
# carry their own retries) too. Matched by name so this module imports neither boto nor the hub.
_PERMANENT_OS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_PERMANENT_NAMES = frozenset(
    {
        # botocore, after its own retries
        "NoCredentialsError",
        "PartialCredentialsError",
        "ProfileNotFound",
        "NoRegionError",
        "ParamValidationError",
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "InvalidConfigError",
        # huggingface_hub
        "RepositoryNotFoundError",
        "GatedRepoError",
        "RevisionNotFoundError",
        "OfflineModeIsEnabled",
        "HFValidationError",
        "DisabledRepoError",
    }
)


class PermanentError(Exception):
    """A failure that a retry cannot fix: the input, config or credentials must change first."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """exc and the exceptions it was raised from (transformers wraps hub errors in OSError)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def s3_error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        return str(response["Error"].get("Code", ""))
    return None


def is_permanent(exc: BaseException) -> bool:
    for cause in _chain(exc):
        if isinstance(cause, (PermanentError, *_PERMANENT_OS)):
            return True
        if any(cls.__name__ in _PERMANENT_NAMES for cls in type(cause).__mro__):
            return True
        if s3_error_code(cause) in PERMANENT_S3_CODES:
            return True
    return False


def is_retryable(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry what may succeed next time, never a permanent failure."""
    exc = state.result(raise_on_failure=False)
    return not (isinstance(exc, BaseException) and is_permanent(exc))


def one_line(exc: BaseException) -> str:
    """The message the CLI prints after `error: `; further lines of a report (data checks) are kept,
    indented, below it."""
    if isinstance(exc, PermanentError):
        return str(exc)
    name = type(exc).__name__
    if name in ("EndpointConnectionError", "ConnectTimeoutError"):
        endpoint = getattr(exc, "kwargs", {}).get("endpoint_url", "")
        return f"cannot connect to the S3 endpoint {endpoint}: check the endpoint URL and that the server is running"
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return (
            f"S3 credentials missing ({exc}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or a profile (AWS_PROFILE, execution.s3.profile)"
        )
    code = s3_error_code(exc)
    if code in CREDENTIAL_S3_CODES:
        return f"S3 rejected the credentials ({code}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile"
    if "ephemeral Prefect API server" in str(exc):
        return (
            f"{exc} Start a server (`prefect server start`) and set PREFECT_API_URL, or allow the temporary "
            "one longer with PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (default 20)"
        )
    lines = str(exc).strip().splitlines() or [""]
    head = f"{name}: {lines[0]}" if lines[0] else name
    return "\n".join([head, *(f"  {line.strip()}" for line in lines[1:] if line.strip())])
