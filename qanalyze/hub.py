"""Whether a hub id can be fetched now: a quick look before transformers' own client, which retries an
unreachable hub for about half a minute and prints a line per retry before giving up."""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

from qanalyze.errors import ModelNotFoundError

_PROBE_SECONDS = 3.0


def _cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _reachable(url: str) -> bool:
    # Name resolution ignores socket timeouts, so the whole probe runs in a thread that is given up on.
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    answer: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((parsed.hostname or "", port), timeout=_PROBE_SECONDS).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(_PROBE_SECONDS)
    return bool(answer and answer[0])


def hub_offline(repo_id: str) -> bool:
    """True when ``repo_id`` must be loaded from the local cache (the hub is unreachable or HF_HUB_OFFLINE
    is set, and a cached copy exists); False when the hub answers. A hub id that is neither reachable nor
    cached is a `ModelNotFoundError`, at once."""
    offline_asked = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if not offline_asked and _reachable(endpoint):
        return False
    if _cached(repo_id):
        return True
    why = "HF_HUB_OFFLINE is set" if offline_asked else f"{urlparse(endpoint).hostname} cannot be reached"
    raise ModelNotFoundError(f"cannot fetch hub model {repo_id}: {why} and it is not in the local cache; give a "
                             "local model folder, a .gguf file or an alias (minilm-l6, smollm2-135m)")
