"""The artifact store on S3 or an S3-compatible server (MinIO, Ceph RGW, ...).

Stages write into a local working copy (`workdir`), and `commit` uploads it with boto3's
transfer manager (multipart above a threshold, several parts and files in flight). Every
object is uploaded with a SHA-256 checksum that the server validates per request, and is
checked afterwards with a HEAD (size plus the checksum the server computed, or the MD5 ETag
on servers run with `checksum_mode: when_required`). Only then is the `_COMPLETE` marker
written, last; it lists every file with size and SHA-256, so `fetch` can verify downloads.

Aliases use S3 conditional writes: `IfNoneMatch="*"` creates an alias only if absent,
`IfMatch=<etag>` replaces it only if nobody moved it since it was read. A server that
answers 412 PreconditionFailed or 409 ConditionalRequestConflict lost us the race
(AliasConflict). Fallback for servers without conditional writes: when a server rejects the
headers as not implemented (501/NotImplemented), the swap re-reads the alias, compares its
ETag with the expected one and then writes unconditionally; on every server the swap reads
the alias back after writing and raises AliasConflict when another writer's document is
there. That narrows, but cannot close, the window in which two writers both believe they
won on a server that silently ignores the headers; the alias still ends on one complete run.

Credentials come from boto3's standard chain (environment, shared config, instance role),
a named profile, or a Prefect block; they are never logged nor written anywhere.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import ClientError
from s3transfer.utils import ChunksizeAdjuster

from qlora_flow import integrity, layout
from qlora_flow.atomic_files import temp_beside
from qlora_flow.config import S3Settings
from qlora_flow.fingerprint import sha256_file
from qlora_flow.store import COMPLETE_MARKER, AliasConflict, ArtifactStore

log = logging.getLogger(__name__)

MIB = 1 << 20
_READ_BLOCK = 8 * MIB
_SHA256_META = "sha256"  # user metadata: hex SHA-256 of the whole object, stored at upload
_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}


class UploadVerificationError(RuntimeError):
    """An uploaded object does not have the size or checksum of the local file."""


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} is not an s3:// URI")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket")
    return bucket, prefix.strip("/")


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _session_from_block(name: str, region: str | None) -> boto3.Session:
    """A boto3 session from a Prefect AwsCredentials block, or a Secret block holding JSON keys."""
    try:
        from prefect_aws import AwsCredentials  # optional dependency
    except ImportError:
        AwsCredentials = None
    if AwsCredentials is not None:
        try:
            return AwsCredentials.load(name).get_boto3_session()
        except ValueError:
            pass  # no AwsCredentials block of that name: try a Secret block
    from prefect.blocks.system import Secret

    value = Secret.load(name).get()
    keys = json.loads(value) if isinstance(value, str) else dict(value)
    missing = sorted({"aws_access_key_id", "aws_secret_access_key"} - keys.keys())
    if missing:
        raise ValueError(f"Prefect Secret block {name!r} lacks the key(s) {missing}")  # names, never values
    return boto3.Session(
        aws_access_key_id=keys["aws_access_key_id"],
        aws_secret_access_key=keys["aws_secret_access_key"],
        aws_session_token=keys.get("aws_session_token"),
        region_name=region or keys.get("region_name"),
    )


def make_client(settings: S3Settings):
    """An S3 client from the standard AWS chain with the overrides in S3Settings."""
    if settings.credentials_block:
        session = _session_from_block(settings.credentials_block, settings.region)
    else:
        session = boto3.Session(profile_name=settings.profile, region_name=settings.region)
    config = Config(
        region_name=settings.region or session.region_name or "us-east-1",
        s3={"addressing_style": settings.addressing_style},
        request_checksum_calculation=settings.checksum_mode,
        response_checksum_validation=settings.checksum_mode,
        retries={"mode": "standard", "total_max_attempts": settings.max_attempts},  # first try included
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        # one pooled connection per transfer thread plus the verification HEADs
        max_pool_connections=2 * settings.max_concurrency + 2,
        # what requests use anyway; named so that presigned URLs (UI links) are SigV4 too, not legacy SigV2
        signature_version="s3v4",
    )
    return session.client("s3", endpoint_url=settings.endpoint_url, config=config)


def transfer_config(settings: S3Settings) -> TransferConfig:
    return TransferConfig(
        multipart_threshold=settings.multipart_threshold_mib * MIB,
        multipart_chunksize=settings.multipart_chunksize_mib * MIB,
        max_concurrency=settings.max_concurrency,
        use_threads=True,
        # the classic manager's part sizes are the ones _LocalDigest predicts
        preferred_transfer_client="classic",
    )


@dataclass(frozen=True)
class _LocalDigest:
    """What the server must report for a file uploaded with the given part layout."""

    size: int
    sha256: str  # hex, whole file
    s3_sha256: str  # base64 SHA-256 (single part) or composite of part SHA-256s with "-N"
    etag: str  # MD5 (single part) or MD5 of part MD5s with "-N"

    @classmethod
    def of(cls, path: Path, cfg: TransferConfig) -> _LocalDigest:
        size = path.stat().st_size
        multipart = size >= cfg.multipart_threshold
        part_size = ChunksizeAdjuster().adjust_chunksize(cfg.multipart_chunksize, size) if multipart else max(size, 1)
        whole = hashlib.sha256()
        part_sha: list[bytes] = []
        part_md5: list[bytes] = []
        with open(path, "rb") as fh:
            while True:
                sha, md5, got = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
                while got < part_size and (block := fh.read(min(part_size - got, _READ_BLOCK))):
                    whole.update(block)
                    sha.update(block)
                    md5.update(block)
                    got += len(block)
                if got == 0 and part_sha:  # end of file on a part boundary
                    break
                part_sha.append(sha.digest())
                part_md5.append(md5.digest())
                if got < part_size:
                    break
        if not multipart:
            return cls(size, whole.hexdigest(), base64.b64encode(part_sha[0]).decode(), part_md5[0].hex())
        n = len(part_sha)
        composite = base64.b64encode(hashlib.sha256(b"".join(part_sha)).digest()).decode()
        etag = hashlib.md5(b"".join(part_md5), usedforsecurity=False).hexdigest()
        return cls(size, whole.hexdigest(), f"{composite}-{n}", f"{etag}-{n}")

    def matches(self, head: dict) -> bool:
        if head.get("ContentLength") != self.size:
            return False
        reported = head.get("ChecksumSHA256")
        if reported:  # AWS appends "-N" to composite checksums, some servers do not
            return reported.split("-")[0] == self.s3_sha256.split("-")[0]
        return head.get("ETag", "").strip('"') == self.etag


def _whole_sha256_agrees(head: dict, sha_hex: str) -> bool:
    """False only when the server reports a whole-object SHA-256 that differs from sha_hex."""
    reported = head.get("ChecksumSHA256")
    single_part = "-" not in head.get("ETag", "")  # multipart checksums are composites of the parts
    return not (reported and single_part) or base64.b64decode(reported).hex() == sha_hex


class S3Store(ArtifactStore):
    def __init__(self, root: str, client, cache_dir: str | Path, settings: S3Settings):
        self.root = root.rstrip("/")
        self.bucket, self.prefix = parse_s3_uri(self.root)
        self.client = client
        self.cache_dir = Path(cache_dir).expanduser().resolve()
        self.settings = settings
        self.transfer = transfer_config(settings)
        # the server validates our SHA-256 per request; servers that reject checksums get none
        self._checksummed = settings.checksum_mode == "when_supported"

    @classmethod
    def from_config(cls, root: str, settings: S3Settings, cache_dir: str | Path) -> S3Store:
        return cls(root, make_client(settings), cache_dir, settings)

    # ---- keys -------------------------------------------------------------------------
    def _k(self, key: str) -> str:
        key = key.strip("/")
        return f"{self.prefix}/{key}" if self.prefix and key else (self.prefix or key)

    def _rel(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._k(key)}"

    def _local(self, key: str) -> Path:
        return self.cache_dir / key.strip("/")

    def _head(self, key: str) -> dict | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._k(key), ChecksumMode="ENABLED")
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND_CODES:
                return None
            raise

    def _extra_args(self, digest_hex: str) -> dict:
        extra = {"Metadata": {_SHA256_META: digest_hex}}
        if self._checksummed:
            extra["ChecksumAlgorithm"] = "SHA256"
        return extra

    # ---- objects ----------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        if self._head(key) is not None:
            return True
        found = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._k(key) + "/", MaxKeys=1)
        return found.get("KeyCount", 0) > 0

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND_CODES:
                raise FileNotFoundError(self.uri(key)) from None
            raise

    def write_bytes(self, key: str, data: bytes) -> None:
        digest = hashlib.sha256(data)
        extra: dict = {"Metadata": {_SHA256_META: digest.hexdigest()}}
        if self._checksummed:
            extra["ChecksumSHA256"] = base64.b64encode(digest.digest()).decode()
        self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, **extra)

    def list(self, prefix: str) -> list[str]:
        if self._head(prefix) is not None:
            return [prefix.strip("/")]
        return sorted(self._rel(k) for k in self._listing(prefix))

    def _listing(self, key: str) -> dict[str, tuple[int, str]]:
        """Full key -> (size, ETag) of every object under the prefix key."""
        found = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._k(key) + "/"
        ):
            found.update({obj["Key"]: (obj["Size"], obj["ETag"].strip('"')) for obj in page.get("Contents", [])})
        return found

    def file_info(self, key: str) -> tuple[int, str]:
        head = self._head(key)
        if head is None:
            raise FileNotFoundError(self.uri(key))
        sha_hex = head.get("Metadata", {}).get(_SHA256_META)
        if sha_hex and not _whole_sha256_agrees(head, sha_hex):
            raise UploadVerificationError(
                f"{self.uri(key)}: stored SHA-256 metadata disagrees with the server's checksum"
            )
        if not sha_hex:  # written by another tool: hash the stored bytes
            digest = hashlib.sha256()
            body = self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"]
            for block in iter(lambda: body.read(_READ_BLOCK), b""):
                digest.update(block)
            sha_hex = digest.hexdigest()
        return head["ContentLength"], sha_hex

    def copy(self, src_key: str, dst_key: str) -> None:
        """Server-side copy; the server recomputes the checksum, so file_info(dst_key) verifies it."""
        size, sha_hex = self.file_info(src_key)
        source = {"Bucket": self.bucket, "Key": self._k(src_key)}
        extra = {**self._extra_args(sha_hex), "MetadataDirective": "REPLACE"}
        if size < 5 * 1024 * MIB:  # one request; CopyObject's limit is 5 GiB
            self.client.copy_object(CopySource=source, Bucket=self.bucket, Key=self._k(dst_key), **extra)
        else:
            self.client.copy(source, self.bucket, self._k(dst_key), ExtraArgs=extra, Config=self.transfer)

    def download(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.client.download_file(self.bucket, self._k(key), str(path), Config=self.transfer)

    # ---- results: workdir / commit / fetch --------------------------------------------
    def workdir(self, key: str) -> Path:
        path = self._local(key)
        (path / COMPLETE_MARKER).unlink(missing_ok=True)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _abort_stale_uploads(self, key: str) -> None:
        """Multipart uploads left by a crashed commit hold storage until aborted."""
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=self._k(key) + "/"
        )
        for page in pages:
            for upload in page.get("Uploads", []):
                log.info("aborting stale multipart upload of %s", upload["Key"])
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])

    def commit(self, key: str) -> str:
        root = self._local(key)
        files = integrity.files_of(root)
        rel = {p: f"{key.strip('/')}/{p.relative_to(root).as_posix()}" for p in files}

        # first un-complete the prefix, so a half-overwritten result never looks finished
        self.client.delete_object(Bucket=self.bucket, Key=self._k(f"{key}/{COMPLETE_MARKER}"))
        self._abort_stale_uploads(key)
        present = self._listing(key)
        wanted = {self._k(k) for k in rel.values()}
        for stale in sorted(present.keys() - wanted):
            self.client.delete_object(Bucket=self.bucket, Key=stale)

        with ThreadPoolExecutor(self.settings.max_concurrency) as pool:
            digests = dict(zip(files, pool.map(lambda p: _LocalDigest.of(p, self.transfer), files)))
        # resume: an object already stored with this size and MD5-based ETag is not sent again
        todo = [p for p in files if present.get(self._k(rel[p])) != (digests[p].size, digests[p].etag)]
        if len(todo) < len(files):
            log.info(
                "%s: %d of %d files already uploaded and verified", self.uri(key), len(files) - len(todo), len(files)
            )

        with create_transfer_manager(self.client, self.transfer) as manager:
            futures = [
                manager.upload(str(p), self.bucket, self._k(rel[p]), extra_args=self._extra_args(digests[p].sha256))
                for p in todo
            ]
            for future in futures:
                future.result()

        with ThreadPoolExecutor(self.settings.max_concurrency) as pool:
            heads = dict(zip(todo, pool.map(lambda p: self._head(rel[p]), todo)))
        for path, head in heads.items():
            if head is None or not digests[path].matches(head):
                raise UploadVerificationError(
                    f"{self.uri(rel[path])}: stored object does not match {path} "
                    f"(local {digests[path].size} bytes; stored {head and head.get('ContentLength')} bytes)"
                )

        listing = {
            "files": {
                p.relative_to(root).as_posix(): {"size": digests[p].size, "sha256": digests[p].sha256} for p in files
            }
        }
        marker = json.dumps(listing, indent=1, sort_keys=True).encode()
        self.write_bytes(f"{key}/{COMPLETE_MARKER}", marker)
        (root / COMPLETE_MARKER).write_bytes(marker)
        log.info("committed %d files to %s", len(files), self.uri(key))
        return self.uri(key)

    def fetch(self, key: str) -> Path:
        try:
            marker = self.read_bytes(f"{key}/{COMPLETE_MARKER}")
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri(key)} is missing or was never completed") from None
        root = self._local(key)
        local_marker = root / COMPLETE_MARKER
        listing = json.loads(marker)["files"]
        if (
            local_marker.exists()
            and local_marker.read_bytes() == marker
            and all(
                (root / rel).is_file() and (root / rel).stat().st_size == meta["size"] for rel, meta in listing.items()
            )
        ):
            return root
        local_marker.unlink(missing_ok=True)
        root.mkdir(parents=True, exist_ok=True)

        def get(rel: str) -> None:
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = temp_beside(target)
            os.close(fd)
            try:
                self.download(f"{key}/{rel}", Path(tmp))
                actual = sha256_file(tmp)
                if actual != listing[rel]["sha256"]:
                    problem = {
                        "file": rel,
                        "problem": "sha256",
                        "expected_sha256": listing[rel]["sha256"],
                        "found_sha256": actual,
                    }
                    raise integrity.CorruptEntry(
                        f"{self.uri(f'{key}/{rel}')}: SHA-256 {actual} != recorded {listing[rel]['sha256']}", [problem]
                    )
                os.replace(tmp, target)
            finally:
                Path(tmp).unlink(missing_ok=True)

        with ThreadPoolExecutor(self.settings.max_concurrency) as pool:
            list(pool.map(get, listing))
        local_marker.write_bytes(marker)
        return root

    def _drop_local_copy(self, key: str) -> bool:
        (self._local(key) / COMPLETE_MARKER).unlink(missing_ok=True)
        return True

    def quarantine(self, key: str, problems: list[dict]) -> str:
        """Server-side copies under quarantine/ first, then the entry is deleted, marker first."""
        where = integrity.quarantine_key(key)
        keys = self.list(key)
        for k in keys:  # the raw bytes as stored, whatever their checksum metadata says
            source = {"Bucket": self.bucket, "Key": self._k(k)}
            self.client.copy(
                source, self.bucket, self._k(f"{where}/entry/{k[len(key.strip('/')) + 1 :]}"), Config=self.transfer
            )
        self.write_json(f"{where}/{layout.REASON_NAME}", integrity.reason_document(key, problems))
        marker = f"{key.strip('/')}/{COMPLETE_MARKER}"
        self.client.delete_object(Bucket=self.bucket, Key=self._k(marker))
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._k(k)} for k in keys[start : start + 1000] if k != marker]
            if batch:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        shutil.rmtree(self._local(key), ignore_errors=True)
        return where

    # ---- aliases ----------------------------------------------------------------------
    def read_alias(self, key: str) -> tuple[dict | None, str | None]:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._k(key))
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND_CODES:
                return None, None
            raise
        return json.loads(obj["Body"].read()), obj["ETag"]

    def swap_alias(self, key: str, document: dict, expected_version: str | None) -> None:
        body = json.dumps(document, indent=2, sort_keys=True).encode()
        condition = {"IfNoneMatch": "*"} if expected_version is None else {"IfMatch": expected_version}
        try:
            written = self.client.put_object(
                Bucket=self.bucket, Key=self._k(key), Body=body, ContentType="application/json", **condition
            )["ETag"]
        except ClientError as exc:
            code = _error_code(exc)
            if code in _CONFLICT_CODES or _status(exc) in (409, 412) or (expected_version and code in _NOT_FOUND_CODES):
                current, _ = self.read_alias(key)
                if current == document:  # our own write landed; a retry of it hit the condition
                    return
                raise AliasConflict(f"{self.uri(key)} was moved by another writer ({code})") from None
            if code in ("NotImplemented", "501") or _status(exc) == 501:
                written = self._swap_without_conditions(key, body, expected_version)
            else:
                raise
        _, now = self.read_alias(key)
        if now != written:
            raise AliasConflict(f"{self.uri(key)} was overwritten by another writer right after our write")

    def _swap_without_conditions(self, key: str, body: bytes, expected_version: str | None) -> str:
        log.warning("%s: server does not support conditional writes; using compare-then-write", self.uri(key))
        _, current = self.read_alias(key)
        if current != expected_version:
            raise AliasConflict(
                f"{self.uri(key)} changed since it was read (expected {expected_version}, found {current})"
            )
        return self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=body, ContentType="application/json")[
            "ETag"
        ]
