"""EFI_RNG_PROTOCOL (UEFI 2.10 §37.5) backed by the host's randomness (os.urandom)."""

from __future__ import annotations

import ctypes
import os

from hostsvc import guids as G
from hostsvc import status as S
from hostsvc import uefi_types as U
from hostsvc.dispatch import OPTGUIDPTR, OPTPTR, PTR, UINTN, efiapi, size_in_out
from hostsvc.status import EfiError

ALGORITHMS = [G.RNG_ALGORITHM_RAW]
#: GetRNG fills the buffer this many bytes at a time
CHUNK = 1 << 20


class Rng:
    def __init__(self, fw):
        self.fw = fw
        self.mem = fw.mem

    def install(self) -> int:
        iface = self.fw.interface("Rng", self, U.EFI_RNG_PROTOCOL)
        return self.fw.handles.install(None, G.RNG, iface)

    @efiapi("GetInfo", ("this", PTR), ("rng_algorithm_list_size", PTR), ("rng_algorithm_list", OPTPTR))
    def get_info(self, this, rng_algorithm_list_size, rng_algorithm_list):
        algorithms = (U.EFI_GUID * len(ALGORITHMS))(*map(U.EFI_GUID.from_uuid, ALGORITHMS))
        size_in_out(self.mem, rng_algorithm_list_size, ctypes.sizeof(algorithms), "the algorithm list")
        if not rng_algorithm_list:
            raise EfiError(S.INVALID_PARAMETER, "RNGAlgorithmList is NULL")
        self.mem.write_struct(rng_algorithm_list, algorithms)

    @efiapi("GetRNG", ("this", PTR), ("rng_algorithm", OPTGUIDPTR), ("rng_value_length", UINTN),
            ("rng_value", PTR))
    def get_rng(self, this, rng_algorithm, rng_value_length, rng_value):
        if rng_value_length == 0:
            raise EfiError(S.INVALID_PARAMETER, "RNGValueLength is 0")
        if rng_algorithm is not None and rng_algorithm not in ALGORITHMS:
            raise EfiError(S.UNSUPPORTED, f"algorithm {G.guid_name(rng_algorithm)}")
        if not self.mem.contains(rng_value, rng_value_length):
            raise EfiError(S.INVALID_PARAMETER, f"RNGValue {rng_value:#x}+{rng_value_length:#x} is "
                                                "outside guest memory")
        # in pieces, the deadline checked between them: the host never holds more than one piece
        done = 0
        while done < rng_value_length:
            self.fw.port.check_deadline()
            n = min(CHUNK, rng_value_length - done)
            self.mem.write(rng_value + done, os.urandom(n))
            done += n
