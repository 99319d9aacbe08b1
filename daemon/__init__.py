"""The service: config, CLI, DICOM SCP/SCU, access control, scheduler, workers, dispatcher.

Rules of this room (DESIGN.md): the only package that talks to the network; holds no state
outside ``storage``.
"""
