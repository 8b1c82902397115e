import numpy as np
import pytest

from megadiff.data.vocab import AUDIO, IMAGE, MODALITY_PAD, TEXT, VocabError, VocabLayout


@pytest.fixture
def v():
    return VocabLayout(
        text_size=100, image_codebook_size=16, audio_codebook_size=8, audio_num_codebooks=2
    )


def test_layout_ids(v):
    # hand-computed for text 100 | 7 text specials | mask pad | boi eoi | 16 | boa eoa | 2*8
    assert v.specials["<bot>"] == 100 and v.specials["<eot>"] == 101
    assert v.specials["<t2i>"] == 102 and v.specials["<text>"] == 106
    assert v.mask_id == 107 and v.pad_id == 108
    assert v.specials["<boi>"] == 109 and v.specials["<eoi>"] == 110
    assert v.image_start == 111
    assert v.specials["<boa>"] == 127 and v.specials["<eoa>"] == 128
    assert v.audio_start == 129 and v.vocab_size == 145
    assert v.ranges() == {TEXT: (0, 107), IMAGE: (109, 127), AUDIO: (127, 145)}
    assert v.ranges_array().tolist() == [[0, 107], [109, 127], [127, 145], [108, 109]]


def test_audio_flattening_interleaved_per_frame(v):
    codes = np.array([[0, 0], [1, 7], [7, 3]])  # 3 frames, 2 codebooks
    assert v.audio_tokens(codes).tolist() == [129, 137, 130, 144, 136, 140]
    assert v.image_tokens(np.array([[0, 1], [15, 2]])).tolist() == [111, 112, 126, 113]


def test_modality_of(v):
    ids = np.array([0, 99, 101, 102, 108, 109, 111, 126, 127, 129, 144])
    assert v.modality_of(ids).tolist() == [0, 0, 0, 0, MODALITY_PAD, 1, 1, 1, 2, 2, 2]
    with pytest.raises(VocabError, match="145"):
        v.modality_of(np.array([3, 145]))


def test_check_ids_names_sample(v):
    v.check_ids(np.array([111, 126]), IMAGE)
    with pytest.raises(VocabError, match=r"shard 3 sample 7: token id 127 is outside the image"):
        v.check_ids(np.array([111, 127]), IMAGE, where="shard 3 sample 7")
    with pytest.raises(VocabError, match="outside the vocabulary"):
        v.check_ids(np.array([-1]))
    with pytest.raises(VocabError, match="dtype"):
        v.check_ids(np.array([1.5]))


def test_json_roundtrip(v, tmp_path):
    p = tmp_path / "vocab.json"
    v.to_json(p)
    w = VocabLayout.from_json(p)
    assert w == v and w.vocab_size == 145
    assert VocabLayout.from_json(v.to_json()) == v
    d = v.to_dict()
    d["mask_id"] = 3
    with pytest.raises(VocabError, match="mask_id"):
        VocabLayout.from_dict(d)
    with pytest.raises(VocabError, match="does not exist"):
        VocabLayout.from_json(tmp_path / "nope.json")


def test_bad_sizes():
    with pytest.raises(VocabError, match="text_size"):
        VocabLayout(text_size=0)
    with pytest.raises(VocabError, match="audio_num_codebooks"):
        VocabLayout(text_size=10, audio_num_codebooks=0)
