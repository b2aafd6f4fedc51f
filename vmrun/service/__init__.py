"""``vmrun daemon``: the Varlink service ``io.vmrun.Manager`` (README "Running as a service").

    config.py     /etc/vmrun/vmrun.conf (TOML): who may call, queue and size limits
    creds.py      the caller's SO_PEERCRED / SO_PEERGROUPS and what it may call
    interface.py  the Varlink interface (methods, errors) on asyncvarlink
    daemon.py     the server: accept loop, lanes and queue, one worker process per request
    worker.py     ``python -m vmrun.service.worker``: one request, run through the CLI's code
    client.py     a small blocking client (``vmrun kexec`` uses it)
    kdumpconf.py  ``vmrun kdump-arm``: arm the crash kernel from /etc/vmrun/kdump.conf
"""
