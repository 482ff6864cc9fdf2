"""The Festival corpus: item lines from phone segments, the speakers, and (where Festival is installed) a tiny
corpus in the ZeroSpeech 2019 layout whose item file the ABX scorer reads."""
from __future__ import annotations

import pytest
import soundfile as sf

from sqaudio.data.corpora import list_zerospeech
from sqaudio.data.festival import Segment, Speaker, build_corpus, item_lines, make_speakers, unavailable
from sqaudio.errors import UserError
from sqaudio.evaluation.items import read_items


def test_item_lines_take_every_phone_between_two_neighbours_with_silence_as_sil():
    segments = [Segment("pau", 0.0, 0.2), Segment("k", 0.2, 0.28), Segment("ae", 0.28, 0.4),
                Segment("t", 0.4, 0.47), Segment("pau", 0.47, 0.7)]
    assert item_lines("KAL0_0001", "KAL0", segments) == ["KAL0_0001 0.2000 0.2800 k SIL ae KAL0",
                                                         "KAL0_0001 0.2800 0.4000 ae k t KAL0",
                                                         "KAL0_0001 0.4000 0.4700 t ae SIL KAL0"]


def test_speakers_are_every_voice_then_pitch_and_rate_variants():
    speakers = make_speakers(6)
    assert [s.name for s in speakers] == ["KAL0", "KED0", "SLT0", "KAL1", "KED1", "SLT1"]
    assert speakers[3].semitones != 0 and speakers[3].rate != 1 and speakers[5].speed > 1
    with pytest.raises(UserError, match="1 to 15 speakers"):
        make_speakers(16)


@pytest.mark.skipif(unavailable() is not None, reason=f"no Festival: {unavailable()}")
def test_a_tiny_festival_corpus_is_a_zerospeech_corpus_with_an_item_file(tmp_path):
    speakers = [Speaker("KAL1", "kal", 4.0, 0.9), Speaker("SLT1", "slt", 4.0, 0.9)]
    summary = build_corpus(tmp_path, speakers, ["A big dog ran.", "The cat sat on a mat."], test_sentences=1)
    assert summary["train_files"] == 2 and summary["test_files"] == 2 and summary["items"] > 10
    listing = list_zerospeech(tmp_path)
    assert sorted((u.speaker, u.split) for u in listing.utterances) == [
        ("KAL1", "test"), ("KAL1", "train"), ("SLT1", "test"), ("SLT1", "train")]
    items = read_items(tmp_path / "english" / "test.item")
    assert set(items.speakers) == {"KAL1", "SLT1"} and len(items) == summary["items"]
    for i, name in enumerate(items.files):
        info = sf.info(tmp_path / "english" / "test" / f"{name}.wav")
        assert info.samplerate == 16000
        assert items.offset[items.file == i].max() <= info.duration
    phones = [{items.phones[p] for p in items.phone[items.speaker == s]} for s in (0, 1)]
    assert len(phones[0] & phones[1]) > 5  # the same sentence, so the same phones, from both speakers
