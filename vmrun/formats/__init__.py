"""File and in-memory formats with no VM and no firmware in them: PE/COFF images (``pe``), the
Linux bzImage setup header (``bzimage``) and the ``boot_params`` a Linux EFI stub fills
(``linux``). Nothing here imports ``hostsvc`` or the upper ``vmrun`` modules."""
