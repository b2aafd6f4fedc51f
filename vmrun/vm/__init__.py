"""The machine layer: the KVM micro-VM (``kvm/``, ``machine``, ``cpu``, ``memory``, ``layout``),
the privileged instructions it emulates (``emulate``) and its legacy port devices (``devices``).

The UEFI services (``hostsvc``) reach the VM only through :class:`vmrun.vm.port.GuestPort`,
plus the ``layout`` and ``memory`` types. Nothing here imports ``hostsvc`` or the upper
``vmrun`` modules (``tests/unit/test_layers.py`` checks).
"""
