#!/usr/bin/env python3
"""The calibflow image's entry point (/usr/local/bin/calibflow-entrypoint): hands the stack's secrets
to the programs that need them, refuses missing, example or weak ones, then runs the command.

    calibflow-entrypoint COMMAND [ARG ...]     # check the secrets, set them up, exec COMMAND
    calibflow-entrypoint --check               # check the secrets only (the secrets-check service)

The secrets are files (Docker secrets, mounted under /run/secrets by compose.yaml), named by:

``CALIBFLOW_DB_PASSWORD_FILE``
    the PostgreSQL password. It is written, URL-encoded, into the database URLs that are set without
    one: ``CALIBFLOW_REGISTRY_URL`` (the registry) and ``PREFECT_SERVER_DATABASE_CONNECTION_URL`` (the
    Prefect server's database). compose.yaml gives those URLs without a password, so neither the
    compose model (``docker compose config``, ``docker inspect``) nor a run's parameters hold it.
``PREFECT_API_AUTH_FILE``
    the Prefect API's ``user:password``: ``PREFECT_SERVER_API_AUTH_STRING`` (the server asks every
    API request for it, as HTTP basic authentication) and ``PREFECT_API_AUTH_STRING`` (the clients:
    the worker, the deployments step, the CLI, the flow runs) are set from it.

Either variable unset: that secret is not used (the image run on its own, ``calibflow --help``). Set:
the file must exist and hold an acceptable value, else the container stops with a message that says
which file and why (never the value). Acceptable: not the example value of docker/secrets.example/,
nor another well-known placeholder, at least MIN_LENGTH characters; the auth string's user and password
both non-empty. This script needs the standard library only.
"""

from __future__ import annotations

import os
import sys
from urllib.parse import quote, urlsplit, urlunsplit

MIN_LENGTH = 12
#: values a person copies from an example or types without thinking (compared case-insensitively)
REFUSED = {"change-me", "changeme", "change_me", "password", "passw0rd", "secret", "postgres", "prefect",
           "calibflow", "admin", "example", "12345678", "123456789012"}
DB_URL_VARS = ("CALIBFLOW_REGISTRY_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL")


class SecretError(Exception):
    pass


def read_secret(path: str, what: str) -> str:
    """The secret in ``path`` (one trailing newline allowed, as the postgres image reads it)."""
    try:
        with open(path, encoding="utf-8") as fh:
            value = fh.read()
    except FileNotFoundError:
        raise SecretError(f"{what}: {path} does not exist (see docker/README.md, 'Secrets')") from None
    except IsADirectoryError:
        raise SecretError(f"{what}: {path} is a folder, not a file (Docker makes one where a secret's "
                          f"file was missing: remove it and create the file)") from None
    except PermissionError:
        raise SecretError(f"{what}: {path} is not readable by uid {os.getuid()} (make the file's owner "
                          f"CALIBFLOW_UID, mode 600)") from None
    except UnicodeDecodeError:
        raise SecretError(f"{what}: {path} is not UTF-8 text") from None
    return value.rstrip("\n")


def weak(value: str) -> str | None:
    """Why ``value`` is not acceptable as a password, or None."""
    if not value.strip():
        return "it is empty"
    if value != value.strip() or "\n" in value:
        return "it has leading or trailing white space or several lines"
    lowered = value.lower()
    if lowered in REFUSED or "change-me" in lowered or "changeme" in lowered:
        return "it is the example value (or a well-known placeholder): generate one, e.g. " \
               "`python3 -c 'import secrets; print(secrets.token_urlsafe(24))'`"
    if len(value) < MIN_LENGTH:
        return f"it is shorter than {MIN_LENGTH} characters"
    return None


def db_password(env: dict[str, str]) -> str | None:
    path = env.get("CALIBFLOW_DB_PASSWORD_FILE")
    if not path:
        return None
    value = read_secret(path, "the database password")
    if why := weak(value):
        raise SecretError(f"the database password in {path} is refused: {why}")
    return value


def api_auth(env: dict[str, str]) -> str | None:
    path = env.get("PREFECT_API_AUTH_FILE")
    if not path:
        return None
    value = read_secret(path, "the Prefect API auth string")
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise SecretError(f"the Prefect API auth string in {path} is refused: write it as user:password")
    if why := weak(password):
        raise SecretError(f"the Prefect API auth string in {path} is refused: its password part: {why}")
    return value


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` (URL-encoded) after its user name, where it has none."""
    parts = urlsplit(url)
    if parts.password is not None or not parts.username:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    netloc = f"{parts.username}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def prepare(env: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """(the environment to run the command with, what was set up, for the log: names, never values)."""
    env = dict(env)
    done = []
    password = db_password(env)
    if password is not None:
        for var in DB_URL_VARS:
            if env.get(var) and (new := with_password(env[var], password)) != env[var]:
                env[var] = new
                done.append(var)
        done.append("database password: accepted")
    auth = api_auth(env)
    if auth is not None:
        env["PREFECT_API_AUTH_STRING"] = env["PREFECT_SERVER_API_AUTH_STRING"] = auth
        done.append("Prefect API auth string: accepted")
    return env, done


def main(argv: list[str]) -> int:
    try:
        env, done = prepare(dict(os.environ))
    except SecretError as exc:
        print(f"calibflow-entrypoint: {exc}", file=sys.stderr)
        return 2
    if not argv or argv == ["--check"]:
        print("calibflow-entrypoint: " + ("; ".join(done) if done else "no secrets configured"))
        return 0
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        print(f"calibflow-entrypoint: cannot run {argv[0]}: {exc}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
