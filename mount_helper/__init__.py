"""mount.layerfs: the drop-in ``mount_program`` for containers/storage and mount(8).

``argv`` parses the command line, ``options`` maps ``-o`` options onto a MountConfig, ``main``
hands it to ``layerfs.mount``. Imports only layerfs.config, layerfs.errors and layerfs.mount.
"""
