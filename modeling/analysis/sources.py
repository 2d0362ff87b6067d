"""Check where a ``--model`` comes from before anything loads, so that the two common dead ends are one
line each instead of a minute of retries or a tokenizer traceback:

* a hub id (``openbmb/MiniCPM-V-2_6``) on a machine that cannot reach the hub (``HF_HUB_OFFLINE`` set, or
  a quick connection probe failing) and that has no cached copy: refused at once, naming the
  local-folder alternative;
* a checkpoint folder (one with config.json) without tokenizer files: refused, naming the files it needs.
"""
import os
import socket
from typing import Optional
from urllib.parse import urlparse

PROBE_SECONDS = 3.0
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))
DEFAULT_ENDPOINT = "https://huggingface.co"


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = PROBE_SECONDS) -> Optional[str]:
    """None when the hub looks reachable; else why not (offline mode, or the probe's error)."""
    if _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"cannot connect to {host}:{port} ({type(e).__name__}: {e})"
    return None


def cached_on_disk(repo_id: str) -> bool:
    """Whether the Hugging Face cache already holds ``repo_id``'s config.json (then no network is needed)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - a malformed id or an old huggingface_hub: not cached as far as we know
        return False
    return isinstance(found, str) and os.path.isfile(found)


def check_model_source(model: Optional[str], flag: str = "--model", timeout: float = PROBE_SECONDS) -> None:
    """Raise ``OSError`` (one line) for a hub id that cannot be fetched here or a folder without tokenizer
    files; ``model`` None (the demo) and everything else pass. No download is attempted."""
    if model is None:
        return
    if os.path.isdir(model):
        names = set(os.listdir(model))
        # a folder without config.json is not a checkpoint at all: the loader's own error names that
        if "config.json" in names and not any(set(group) <= names for group in TOKENIZER_FILES):
            raise OSError(f"{flag} {model}: no tokenizer files (expected tokenizer.json, or vocab.json + merges.txt, "
                          f"or tokenizer.model next to config.json); copy them from the original checkpoint")
        return
    if cached_on_disk(model):
        return
    why = hub_reachable(timeout)
    if why is not None:
        name = model.rsplit("/", 1)[-1]
        raise OSError(f"{flag} {model}: cannot reach the Hugging Face hub ({why}) and it is not in the local cache; "
                      f"download it where there is network (huggingface-cli download {model} --local-dir "
                      f"/models/{name}) and pass the local folder: {flag} /models/{name}")


__all__ = ["PROBE_SECONDS", "TOKENIZER_FILES", "cached_on_disk", "check_model_source", "hub_reachable"]
