"""``mount.layerfs ARGV`` in a fork server's child: the server's side of the thin request.

``mount.layerfs`` sends its command line to the fork server of its namespace first
(layerfs.forkclient.ask); the child forked for it runs this with everything imported, and
does what main() would: parse, check, lock the workdir, mount, answer, then serve in place.
Anything else (another action, the foreground, a fake mount, an error) is declined with
nothing done, and the caller runs main() itself: its messages and exit codes stay the ones
main() gives.
"""

from __future__ import annotations

import os

from layerfs.errors import LayerfsError
from layerfs.forkserver import Reply
from layerfs.mount import serve_here
from mount_helper.argv import parse_argv
from mount_helper.options import build_config


def served(argv: list[str], reply: Reply) -> int:
    """Mount and serve ARGV (``argv[0]`` first) here, or decline it; the exit status."""
    try:
        inv = parse_argv(argv[1:], argv[0])
        if inv.action != "mount" or inv.foreground or inv.fake:
            reply.decline()
            return 0
        config = build_config(inv, os.getcwd()).validate()
        return serve_here(config, lambda: reply.ready(config.mountpoint, config.warnings))
    except LayerfsError:  # nothing is mounted: the caller tries and reports it
        reply.decline()
        return 0
