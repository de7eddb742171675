"""mount.layerfs: the drop-in ``mount_program`` for containers/storage and mount(8).

``main`` hands the command line to the fork server (layerfs.forkclient) or else parses it:
``argv`` parses the command line, ``options`` maps ``-o`` options onto a MountConfig, ``main``
hands it to ``layerfs.mount``; ``served`` does the same in a fork server's child.
"""

PROG = "mount.layerfs"
