"""Host headers: what the two web servers (the labeling app and `rlhfkit serve`) compare with their allowed hosts,
so that a page on another site cannot reach a loopback server through DNS rebinding."""


def host_name(header: str | None) -> str | None:
    """The host part of a Host header, lowercased, without port, brackets or trailing dot; None if malformed."""
    if not header:
        return None
    value = header.strip().lower()
    if value.startswith("["):  # [IPv6]:port
        end = value.find("]")
        rest = value[end + 1:] if end > 0 else "x"
        if end < 0 or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return value[1:end]
    name, colon, port = value.partition(":")
    if colon and not port.isdigit():
        return None
    return name.rstrip(".") or None


def normalise_hosts(hosts) -> set[str]:
    """Allowed host names as host_name writes them (no brackets, trailing dot or case); blanks dropped."""
    return {h.strip().lower().strip("[]").rstrip(".") for h in hosts if h and h.strip()}
