"""SigV4 query signing (`backends.sigv4`) against botocore's own presigner:
the same request at the same second gets the same signature, for the keys,
listings and credentials a restore signs (keys with spaces, '+', non-ASCII;
a session token; path- and virtual-host-addressed endpoints). Neither
test server checks a SigV4 signature's value (s3rver checks its key id,
moto nothing), so this comparison is what holds the signatures right."""

from __future__ import annotations

import calendar
import time
from urllib.parse import parse_qsl, unquote, urlsplit

import pytest

from ckpt_cli.backends.sigv4 import Credentials, presign

botocore_session = pytest.importorskip("botocore.session")
botocore_config = pytest.importorskip("botocore.config")

CASES = [
    ("http://127.0.0.1:9000", "us-east-1", None, "path"),
    ("https://s3.eu-west-1.amazonaws.com", "eu-west-1", "FwoGZX/token+with=signs", "virtual"),
]
REQUESTS = [
    ("get_object", {"Bucket": "bkt", "Key": "repo/chunks/ab/c d+é~!*'()"}),
    ("get_object", {"Bucket": "bkt", "Key": "repo/ckpt.json", "VersionId": "v/1+2"}),
    (
        "list_objects_v2",
        {
            "Bucket": "bkt",
            "Prefix": "repo/snap shots/",
            "Delimiter": "/",
            "ContinuationToken": "a/b=+",
        },
    ),
]


@pytest.mark.parametrize(("endpoint", "region", "token", "style"), CASES)
@pytest.mark.parametrize(("operation", "params"), REQUESTS)
def test_the_signature_is_botocores(
    endpoint: str,
    region: str,
    token: str | None,
    style: str,
    operation: str,
    params: dict[str, str],
) -> None:
    client = botocore_session.get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        aws_session_token=token,
        config=botocore_config.Config(signature_version="s3v4", s3={"addressing_style": style}),
    )
    theirs = urlsplit(client.generate_presigned_url(operation, Params=params, ExpiresIn=900))
    query = dict(parse_qsl(theirs.query, keep_blank_values=True))
    when = calendar.timegm(time.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
    own = {k: v for k, v in query.items() if not k.startswith("X-Amz-")}
    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)

    ours = urlsplit(
        presign(
            "GET",
            theirs.scheme,
            theirs.netloc,
            unquote(theirs.path),
            own,
            creds,
            region,
            expires=900,
            now=when,
        )
    )

    assert (ours.scheme, ours.netloc, ours.path) == (theirs.scheme, theirs.netloc, theirs.path)
    assert dict(parse_qsl(ours.query, keep_blank_values=True)) == query


def test_credentials_never_show_the_secret() -> None:
    creds = Credentials("AKID", "the-secret", "the-token")
    assert "the-secret" not in repr(creds) and "the-token" not in repr(creds)
    assert "the-secret" not in str(creds)
