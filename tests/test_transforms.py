"""The one image path: every input kind and mode, the three resize policies (checked against transformers' own
image processors), EXIF orientation, and the transform travelling with the processor and the encoder."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vlkit.data.transforms import ImageTransform
from vlkit.errors import VlkitError

MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("policy", ["squash", "crop", "pad"])
def test_every_input_kind_reaches_the_encoders_size(policy, tmp_path):
    t = ImageTransform.of(32, MEAN, STD, policy)
    arr = rgb(40, 50)
    Image.fromarray(arr).save(tmp_path / "a.png")
    inputs = [arr, Image.fromarray(arr), tmp_path / "a.png", str(tmp_path / "a.png"),
              arr[..., 0], arr[..., :1], np.dstack([arr, np.full((40, 50), 255, np.uint8)]),
              arr.astype(np.uint16) * 257, arr.astype(np.float32) / 255, arr > 127]
    out = t(inputs)
    assert out.shape == (len(inputs), 3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2]) and torch.equal(out[2], out[3])
    assert torch.equal(out[4], out[5])                      # HxW and HxWx1 are the same grey image
    assert torch.equal(out[6], out[0])                      # opaque RGBA is its RGB
    assert torch.allclose(out[7], out[0]) and torch.allclose(out[8], out[0])  # uint16 and float in [0, 1]


def test_transparency_composites_on_white_and_greys_stay_grey():
    t = ImageTransform.of(4, [0, 0, 0], [1, 1, 1])
    clear = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    assert torch.equal(t([clear])[0], torch.ones(3, 4, 4))
    grey = t([np.full((4, 4), 128, np.uint8)])[0]
    assert torch.allclose(grey, torch.full((3, 4, 4), 128 / 255))


@pytest.mark.parametrize("bad,match", [(np.zeros((3, 8, 8), np.uint8), "channels go last"),
                                       (np.zeros((8, 8, 2), np.uint8), "is not an image"),
                                       (np.full((8, 8, 3), 2.0, np.float32), "within \\[0, 1\\]"),
                                       (np.zeros((8, 8, 3), np.complex64), "not an image dtype"),
                                       (np.zeros((0, 8, 3), np.uint8), "has no pixels"),
                                       ("missing.png", "missing.png: image not found"), (42, "int is not an image")])
def test_what_is_not_an_image_is_a_one_line_error(bad, match):
    with pytest.raises(VlkitError, match=match):
        ImageTransform.of(8)([bad])


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # white left half of a landscape image
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": the stored landscape is a portrait
    Image.fromarray(arr).save(tmp_path / "r.jpg", exif=exif, quality=100)
    from vlkit.data.images import load_image

    img = load_image(tmp_path / "r.jpg")
    assert img.size == (20, 40)  # upright: portrait
    top, bottom = np.asarray(img)[:20].mean(), np.asarray(img)[20:].mean()
    assert top > 200 and bottom < 50  # the white half is now on top


def test_crop_and_pad_preprocess_exactly_as_transformers_does():
    from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil

    imgs = [Image.fromarray(rgb(40, 50, 1)), Image.fromarray(rgb(61, 30, 2)), Image.fromarray(rgb(32, 32, 3))]
    crop = ImageTransform.of(32, MEAN, STD, "crop")
    clip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                 do_center_crop=True, image_mean=MEAN, image_std=STD, resample=3)
    assert torch.allclose(crop(imgs), clip(images=imgs, return_tensors="pt")["pixel_values"], atol=1e-5)
    pad = ImageTransform.of(32, MEAN, STD, "pad")
    llava = LlavaImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False, do_pad=True,
                                   image_mean=MEAN, image_std=STD, resample=3)
    assert torch.allclose(pad(imgs), llava(images=imgs, return_tensors="pt")["pixel_values"], atol=1e-5)
    for t in (crop, pad, ImageTransform.of(32, MEAN, STD)):  # and the export's own processors agree
        theirs = t.hf_image_processor()(images=imgs, return_tensors="pt")["pixel_values"]
        assert torch.allclose(t(imgs), theirs, atol=1e-5), t
    wide = np.asarray(pad.resized(Image.fromarray(np.zeros((10, 40, 3), np.uint8))))
    assert tuple(wide[0, 0]) == pad.fill and tuple(wide[16, 16]) == (0, 0, 0)  # mean-colour bands above and below


def test_an_hf_encoder_takes_its_preprocessor_config_and_the_processor_saves_it(tmp_path, tiny_tokenizer):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from test_vlm import LLMS
    from vlkit.data.processor import VLProcessor
    from vlkit.models.vision import EncoderConfig
    from vlkit.models.vlm import LLMSource, VisionLanguageModel, VLMConfig

    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=32, patch_size=8))
    tower.save_pretrained(tmp_path / "t")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
                       image_mean=MEAN, image_std=STD).save_pretrained(tmp_path / "t")
    tok = tiny_tokenizer
    arch = {**LLMS["llama"], "vocab_size": len(tok)}
    model = VisionLanguageModel.build(VLMConfig(tower=EncoderConfig(path=str(tmp_path / "t")),
                                                llm=LLMSource(arch=arch), max_length=64),
                                      image_token_id=tok.convert_tokens_to_ids("<image>"))
    t = model.vision.encoders[0].transform
    assert (t.size, t.config.resize, t.mean) == (32, "crop", MEAN)  # what CLIP-336's preprocessor says
    proc = VLProcessor.for_model(tok, model)
    proc.save(tmp_path / "p")
    again = VLProcessor.load(tmp_path / "p")
    assert again.transforms == [t]
    padded = VisionLanguageModel.build(VLMConfig(tower=EncoderConfig(path=str(tmp_path / "t"), resize="pad"),
                                                 llm=LLMSource(arch=arch), max_length=64))
    assert padded.vision.transforms[0].config.resize == "pad"  # the config overrides the preprocessor


def test_a_processor_saved_before_transforms_loads_as_one_squash_transform(tmp_path, tiny_tokenizer):
    import json

    from vlkit.data.processor import VLProcessor

    tiny_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps(
        {"processor_class": "VLProcessor", "image_size": 16, "image_mean": [0.1, 0.2, 0.3],
         "image_std": [0.5, 0.5, 0.5], "num_image_tokens": 4, "max_length": 99}))
    p = VLProcessor.load(tmp_path)
    assert p.transforms == [ImageTransform.of(16, [0.1, 0.2, 0.3], [0.5, 0.5, 0.5], "squash")]
    assert p.config.image_tokens == 4 and p.config.max_length == 99
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_tokens": "many"}))
    with pytest.raises(VlkitError, match="processor_config.json: not a vlkit processor config"):
        VLProcessor.load(tmp_path)


def test_served_images_decode_like_files(tmp_path):
    """A PNG sent as bytes (the server's path) and the same file on disk give the same tensor."""
    arr = rgb(40, 50, 5)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    Image.fromarray(arr).save(tmp_path / "x.png")
    t = ImageTransform.of(24, MEAN, STD, "crop")
    assert torch.equal(t([Image.open(io.BytesIO(buf.getvalue()))]), t([tmp_path / "x.png"]))
