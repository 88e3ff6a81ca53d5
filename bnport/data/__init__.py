"""Calibration data readers: `open_images` turns a Data SRC (an image folder, a list file, MXNet RecordIO or an
insightface `.bin` pack) into an `ImageDataset` whose items are network inputs under an `InputSpec`, and
`collate_images` batches them while counting the images that could not be decoded.
"""
from bnport.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "BinPack": "bnport.data.binpack", "BinPackDataset": "bnport.data.binpack", "read_bin_pack": "bnport.data.binpack",
    "IMAGE_SUFFIXES": "bnport.data.folder", "ImageDataset": "bnport.data.folder",
    "ImageFilesDataset": "bnport.data.folder", "UnreadableImageError": "bnport.data.folder",
    "decode_image": "bnport.data.folder", "open_folder": "bnport.data.folder", "open_list": "bnport.data.folder",
    "IRHeader": "bnport.data.recordio", "RecordIODataset": "bnport.data.recordio",
    "RecordIOReader": "bnport.data.recordio", "unpack_record": "bnport.data.recordio",
    "InputSpec": "bnport.data.transforms",
    "collate_images": "bnport.data.sources", "open_images": "bnport.data.sources",
})
