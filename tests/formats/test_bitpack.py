"""Dense k-bit packing: exact round trips on awkward lengths, chunk geometry and hand-computed bytes."""

from __future__ import annotations

import pytest
import torch

from moequant.formats.bitpack import chunk_geometry, pack, packed_len, unpack


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 545, 830])
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
def test_round_trip_exact(bits: int, n: int, lead: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (*lead, n), generator=g)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*lead, packed_len(n, bits))
    if 8 % bits == 0:  # no chunk padding beyond the last byte
        assert packed_len(n, bits) == -(-n * bits // 8)
    out = unpack(packed, bits, n)
    assert out.dtype == torch.uint8
    assert torch.equal(out.long(), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_extreme_codes_and_empty(bits: int) -> None:
    top = torch.full((4, 13), (1 << bits) - 1)
    assert torch.equal(unpack(pack(top, bits), bits, 13).long(), top)
    empty = torch.zeros((0, 5), dtype=torch.int64)
    assert pack(empty, bits).shape == (0, packed_len(5, bits))
    assert unpack(pack(torch.zeros(2, 0, dtype=torch.int64), bits), bits, 0).shape == (2, 0)


def test_geometry() -> None:
    assert chunk_geometry(3) == (8, 3)
    assert chunk_geometry(6) == (4, 3)
    assert chunk_geometry(4) == (2, 1)
    assert packed_len(8, 3) == 3  # 8 three-bit codes in exactly 3 bytes
    assert packed_len(9, 3) == 6  # padded to whole chunks
    assert packed_len(545, 4) == 273
    assert packed_len(830, 7) == 104 * 7


def test_known_bytes() -> None:
    # 3-bit codes 0..7: word = sum(i << 3i) = 0xFAC688 -> little-endian bytes 0x88, 0xC6, 0xFA.
    assert pack(torch.arange(8), 3).tolist() == [0x88, 0xC6, 0xFA]
    # 4-bit: even code in the low nibble.
    assert pack(torch.tensor([1, 2, 15, 0, 7]), 4).tolist() == [0x21, 0x0F, 0x07]
    # 2-bit: [1, 2, 3] -> 1 | 2<<2 | 3<<4 = 0x39 (padded with a zero code).
    assert pack(torch.tensor([1, 2, 3]), 2).tolist() == [0x39]
    # 6-bit: [63, 1, 0, 32] -> 63 | 1<<6 | 32<<18 = 0x80007F -> 0x7F, 0x00, 0x80.
    assert pack(torch.tensor([63, 1, 0, 32]), 6).tolist() == [0x7F, 0x00, 0x80]
    assert unpack(torch.tensor([0x88, 0xC6, 0xFA], dtype=torch.uint8), 3, 8).tolist() == list(range(8))


def test_errors() -> None:
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([-1]), 4)
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([256]), 8)  # 8-bit codes take their own short path: same checks
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([-1]), 8)
    with pytest.raises(ValueError, match="1..8"):
        pack(torch.tensor([0]), 9)
    with pytest.raises(ValueError, match="does not hold"):
        unpack(torch.zeros(2, dtype=torch.uint8), 3, 8)


def test_eight_bit_packing_copies_its_input() -> None:
    codes = torch.tensor([[0, 255, 7]], dtype=torch.uint8)
    packed = pack(codes, 8)
    codes[0, 0] = 9  # the packed tensor is not a view of the codes it was given
    assert packed.tolist() == [[0, 255, 7]]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_unpack_and_trellis_states_follow_the_input_device(bits):
    """The shift tables are made on the codes' device: on a GPU a CPU table raised "Expected all tensors to be
    on the same device" in the reference decode (seen on an H200). The meta device shows it without a GPU."""
    from moequant.codecs.config import TrellisConfig
    from moequant.codecs.trellis import words_per_tile
    from moequant.formats.trellis_bits import unpack_tile_states, unpack_tile_states_bitwise

    packed = torch.empty(3, packed_len(10, bits), dtype=torch.uint8, device="meta")
    out = unpack(packed, bits, 10)
    assert out.device.type == "meta" and out.shape == (3, 10)
    cfg = TrellisConfig(bits=2, L=12, V=1, tile=16, code="1mad")
    words = torch.empty(5, words_per_tile(cfg), dtype=torch.uint16, device="meta")
    assert unpack_tile_states(words, cfg).device.type == "meta"
    assert unpack_tile_states_bitwise(words, cfg).device.type == "meta"
