"""Test data for ingest: valid DICOM Part 10 and PNG/TIFF files, and the broken ones a real dataset holds."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MediaStorageDirectoryStorage,
    RLELossless,
    generate_uid,
)

__all__ = [
    "CANARY",
    "CANARY_VALUES",
    "MPEG2",
    "canary_strings",
    "declared_larger",
    "deflate_bomb",
    "dicom_without_pixels",
    "dicomdir",
    "png_bomb",
    "truncate",
    "unsupported_syntax",
    "write_dicom",
    "write_raster",
]

#: MPEG2 Main Profile @ Main Level: encapsulated video no pixel-data plugin decodes.
MPEG2 = "1.2.840.10008.1.2.4.100"

_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
_SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
_SC_MULTIFRAME_BYTE = "1.2.840.10008.5.1.4.1.1.7.2"
_SC_MULTIFRAME_WORD = "1.2.840.10008.5.1.4.1.1.7.3"
_SC_MULTIFRAME_COLOR = "1.2.840.10008.5.1.4.1.1.7.4"
_PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
_BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
_RT_PLAN = "1.2.840.10008.5.1.4.1.1.481.5"

_PIXEL_DATA = 0x7FE00010
_FLOAT_PIXEL_DATA = 0x7FE00008
_DOUBLE_PIXEL_DATA = 0x7FE00009


def _canary(keyword: str, vr: str) -> str:
    # NB: SH is at most 16 characters; a longer value would fail pydicom's write validation.
    value = f"PHI_CANARY_{keyword}"
    return value[:16] if vr == "SH" else value


# Identifying attributes of DICOM PS3.15 Annex E (Basic Profile) that a CT or secondary-capture file carries,
# as keyword -> VR. UIDs are not here: they are fresh per file (see `canary_strings`).
_TEXT_KEYWORDS = {
    "PatientName": "PN",
    "PatientID": "LO",
    "IssuerOfPatientID": "LO",
    "OtherPatientIDs": "LO",
    "OtherPatientNames": "PN",
    "PatientBirthName": "PN",
    "PatientMotherBirthName": "PN",
    "PatientAddress": "LO",
    "PatientTelephoneNumbers": "SH",
    "MilitaryRank": "LO",
    "BranchOfService": "LO",
    "MedicalRecordLocator": "LO",
    "EthnicGroup": "SH",
    "Occupation": "SH",
    "PatientComments": "LT",
    "AdditionalPatientHistory": "LT",
    "ResponsiblePerson": "PN",
    "ResponsibleOrganization": "LO",
    "CountryOfResidence": "LO",
    "RegionOfResidence": "LO",
    "AccessionNumber": "SH",
    "StudyID": "SH",
    "StudyDescription": "LO",
    "SeriesDescription": "LO",
    "ProtocolName": "LO",
    "ImageComments": "LT",
    "DerivationDescription": "ST",
    "InstitutionName": "LO",
    "InstitutionAddress": "ST",
    "InstitutionalDepartmentName": "LO",
    "ReferringPhysicianName": "PN",
    "ReferringPhysicianAddress": "ST",
    "ReferringPhysicianTelephoneNumbers": "SH",
    "PerformingPhysicianName": "PN",
    "NameOfPhysiciansReadingStudy": "PN",
    "PhysiciansOfRecord": "PN",
    "OperatorsName": "PN",
    "RequestingPhysician": "PN",
    "RequestingService": "LO",
    "RequestedProcedureDescription": "LO",
    "PerformedProcedureStepDescription": "LO",
    "PerformedProcedureStepID": "SH",
    "AdmittingDiagnosesDescription": "LO",
    "StationName": "SH",
    "DeviceSerialNumber": "LO",
}

# NB: dates and times must stay valid DA/TM/DT (a reader may parse them), so they get distinctive valid values.
_DATE_KEYWORDS = {
    "PatientBirthDate": ("DA", "19010203"),
    "StudyDate": ("DA", "19020304"),
    "SeriesDate": ("DA", "19030405"),
    "AcquisitionDate": ("DA", "19040506"),
    "ContentDate": ("DA", "19050607"),
    "PerformedProcedureStepStartDate": ("DA", "19060708"),
    "PatientBirthTime": ("TM", "010203.040506"),
    "StudyTime": ("TM", "020304.050607"),
    "SeriesTime": ("TM", "030405.060708"),
    "AcquisitionTime": ("TM", "040506.070809"),
    "ContentTime": ("TM", "050607.080910"),
    "AcquisitionDateTime": ("DT", "19070809060708.091011"),
}

#: keyword -> (VR, value) of every fixed canary `write_dicom(..., canary=True)` writes.
CANARY = {kw: (vr, _canary(kw, vr)) for kw, vr in _TEXT_KEYWORDS.items()} | _DATE_KEYWORDS
#: Every fixed canary value (PHI_CANARY_* strings and the distinctive dates and times).
CANARY_VALUES = [value for _, value in CANARY.values()]

_UID_KEYWORDS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
# Identifying values shorter than this (e.g. PatientID "P1") are too short to grep outputs for.
_MIN_CANARY_LENGTH = 6


def _layout(pixels: np.ndarray, photometric: str) -> tuple[int, int, int, int]:
    """(frames, rows, columns, samples) of a pixel array; frames is 0 for a single-frame image."""
    color = photometric != "MONOCHROME1" and photometric != "MONOCHROME2"
    if pixels.ndim == 2 and not color:
        return 0, *pixels.shape, 1
    if pixels.ndim == 3 and not color:
        return *pixels.shape, 1
    if pixels.ndim == 3 and color and pixels.shape[-1] == 3:
        return 0, *pixels.shape[:2], 3
    if pixels.ndim == 4 and color and pixels.shape[-1] == 3:
        return *pixels.shape[:3], 3
    raise ValueError(f"pixels of shape {pixels.shape} do not fit photometric {photometric}")


def _sop_class(modality: str, frames: int, samples: int, dtype: np.dtype) -> str:
    if dtype.kind == "f":
        return _PARAMETRIC_MAP
    if samples == 3:
        return _SC_MULTIFRAME_COLOR if frames else _SC_IMAGE
    if frames:
        return _SC_MULTIFRAME_BYTE if dtype.itemsize == 1 else _SC_MULTIFRAME_WORD
    return _CT_IMAGE if modality == "CT" else _SC_IMAGE


def _file_meta(sop_class: str, sop_uid: str, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    return meta


def _modality_lut_item(modality_lut) -> Dataset:
    """A ModalityLUTSequence item from an array of LUT values (first mapped 0) or (first_mapped, values)."""
    first, values = modality_lut if isinstance(modality_lut, tuple) else (0, modality_lut)
    values = np.asarray(values)
    if values.min() < 0 or values.max() > 0xFFFF:
        raise ValueError("modality LUT values must fit 16 bits unsigned")
    item = Dataset()
    n = len(values)
    # NB: 65536 entries are written as 0 in the descriptor (PS3.3 C.11.1.1.1).
    item.add(DataElement(0x00283002, "US", [0 if n == 65536 else n, int(first), 16]))
    item.ModalityLUTType = "HU"
    item.add(DataElement(0x00283006, "US", [int(v) for v in values]))
    return item


def write_dicom(path, pixels, *, photometric="MONOCHROME2", transfer_syntax=ExplicitVRLittleEndian, modality="CT",
                slope=None, intercept=None, padding=None, padding_limit=None, modality_lut=None, sop_uid=None,
                patient_id=None, study_uid=None, series_uid=None, canary=False, manufacturer="ACME",
                model="Scanner 1", pixel_spacing=(0.5, 0.5), extra=None) -> Path:
    """Write `pixels` as a valid DICOM Part 10 file (preamble, 'DICM', file meta) and return its path.

    Parameters
    ----------
    path : str or Path
        Where to write (parent folders are created).
    pixels : numpy.ndarray
        (rows, cols), (frames, rows, cols), or with a trailing axis of 3 for ``photometric="RGB"``. The dtype
        decides the pixel module: uint8/uint16/int16/uint32/int32 go to PixelData, float32 to FloatPixelData,
        float64 to DoubleFloatPixelData.
    photometric : str
        PhotometricInterpretation (MONOCHROME1, MONOCHROME2 or RGB; RGB is written with PlanarConfiguration 0).
    transfer_syntax : str
        ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian,
        RLELossless (pydicom's encoder; up to 16 bits) or JPEG2000Lossless (pylibjpeg-openjpeg; up to 16 bits,
        frames of at least 32x32 px: OpenJPEG's default resolution levels fail on smaller ones).
    modality : str
    slope, intercept : float, optional
        RescaleSlope / RescaleIntercept.
    padding, padding_limit : int, optional
        PixelPaddingValue / PixelPaddingRangeLimit (US or SS after the pixel representation).
    modality_lut : array or (first_mapped, array), optional
        A ModalityLUTSequence (16-bit LUT data) instead of a rescale.
    sop_uid, study_uid, series_uid : str, optional
        Default: fresh UIDs.
    patient_id : str, optional
        Default "P1", or the canary value when `canary` is true.
    canary : bool
        Fill the identifying attributes of PS3.15 Annex E with `CANARY` values (see `canary_strings`).
    manufacturer, model : str
    pixel_spacing : (float, float) or None
    extra : dict, optional
        More attributes, keyword -> value, set last.

    Returns
    -------
    Path
    """
    path = Path(path)
    pixels = np.asarray(pixels)
    frames, rows, cols, samples = _layout(pixels, photometric)
    sop_uid = sop_uid or generate_uid()
    sop_class = _sop_class(modality, frames, samples, pixels.dtype)
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_uid, ExplicitVRLittleEndian)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality = modality
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model
    ds.InstanceNumber = 1
    if canary:
        for keyword, (_, value) in CANARY.items():
            setattr(ds, keyword, value)
    ds.PatientID = patient_id if patient_id is not None else ds.get("PatientID", "P1")
    if pixel_spacing is not None:
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rows, cols
    if frames:
        ds.NumberOfFrames = frames
    itemsize = pixels.dtype.itemsize
    ds.BitsAllocated = 8 * itemsize
    if pixels.dtype.kind in "ui":
        ds.BitsStored = 8 * itemsize
        ds.HighBit = 8 * itemsize - 1
        ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    elif pixels.dtype.kind != "f" or itemsize not in (4, 8):
        raise ValueError(f"no DICOM pixel module for dtype {pixels.dtype}")
    if slope is not None or intercept is not None:
        ds.RescaleSlope = 1.0 if slope is None else slope
        ds.RescaleIntercept = 0.0 if intercept is None else intercept
        ds.RescaleType = "HU" if modality == "CT" else "US"
    if modality_lut is not None:
        ds.ModalityLUTSequence = Sequence([_modality_lut_item(modality_lut)])
    signed_vr = "SS" if pixels.dtype.kind == "i" else "US"
    if padding is not None:
        ds.add(DataElement(0x00280120, signed_vr, int(padding)))
    if padding_limit is not None:
        ds.add(DataElement(0x00280121, signed_vr, int(padding_limit)))
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    _set_pixels(ds, pixels, transfer_syntax)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _set_pixels(ds: Dataset, pixels: np.ndarray, transfer_syntax: str) -> None:
    """Encode `pixels` into `ds` under `transfer_syntax` (and set the file meta's transfer syntax)."""
    if transfer_syntax in (RLELossless, JPEG2000Lossless):
        if pixels.dtype.kind == "f":
            raise ValueError("float pixel data cannot be compressed")
        # NB: compress() would otherwise give the file a new SOPInstanceUID.
        ds.compress(transfer_syntax, pixels, generate_instance_uid=False)
        return
    if transfer_syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                               DeflatedExplicitVRLittleEndian):
        raise ValueError(f"write_dicom does not encode transfer syntax {transfer_syntax}")
    # NB: pydicom writes OB/OW/OF/OD values as given, without byte swapping: big endian is done here.
    order = ">" if transfer_syntax == ExplicitVRBigEndian else "<"
    data = pixels.astype(pixels.dtype.newbyteorder(order), copy=False).tobytes()
    if len(data) % 2:
        data += b"\0"
    if pixels.dtype.kind == "f":
        tag, vr = (_FLOAT_PIXEL_DATA, "OF") if pixels.dtype.itemsize == 4 else (_DOUBLE_PIXEL_DATA, "OD")
    else:
        tag, vr = _PIXEL_DATA, "OB" if pixels.dtype.itemsize == 1 else "OW"
    ds.add(DataElement(tag, vr, data))
    ds.file_meta.TransferSyntaxUID = transfer_syntax


def canary_strings(ds_or_path) -> list[str]:
    """Every identifying value written to a DICOM file: canary texts, dates, times, ids and raw UIDs.

    Values shorter than 6 characters (e.g. the default PatientID "P1") are left out: too short to grep for.
    """
    ds = ds_or_path if isinstance(ds_or_path, Dataset) else pydicom.dcmread(ds_or_path, stop_before_pixels=True)
    found = []
    for keyword in (*CANARY, *_UID_KEYWORDS):
        value = ds.get(keyword)
        if value is None:
            continue
        for v in value if isinstance(value, pydicom.multival.MultiValue) else [value]:
            text = str(v)
            if len(text) >= _MIN_CANARY_LENGTH and text not in found:
                found.append(text)
    return found


def write_raster(path, pixels=None, *, fmt="PNG", frames=None, palette=None) -> Path:
    """Write a PNG or TIFF with Pillow and return its path.

    Parameters
    ----------
    path : str or Path
    pixels : numpy.ndarray, optional
        uint8 or uint16 (rows, cols) gray, uint8 (rows, cols, 3) RGB or (rows, cols, 4) RGBA, float32
        (rows, cols) for a TIFF mode 'F'; uint8 palette indices with `palette`.
    fmt : {"PNG", "TIFF"}
    frames : list of numpy.ndarray, optional
        The pages of a multi-page TIFF (2-D arrays of one dtype), instead of `pixels`.
    palette : sequence of int, optional
        A flat RGB palette (r0, g0, b0, r1, ...): the image is written in mode 'P'.

    Returns
    -------
    Path
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if frames is not None:
        if fmt != "TIFF" or pixels is not None:
            raise ValueError("frames= makes a multi-page TIFF, without pixels=")
        pages = [_pil_image(np.asarray(f)) for f in frames]
        pages[0].save(path, format="TIFF", save_all=True, append_images=pages[1:])
        return path
    img = _pil_image(np.asarray(pixels))
    if palette is not None:
        if img.mode != "L":
            raise ValueError("a palette image takes uint8 indices")
        img = Image.frombytes("P", img.size, img.tobytes())
        img.putpalette(list(palette))
    if img.mode == "F" and fmt != "TIFF":
        raise ValueError("float32 pixels need fmt='TIFF'")
    img.save(path, format=fmt)
    return path


def _pil_image(a: np.ndarray) -> Image.Image:
    """A Pillow image of an array, in the mode its dtype and shape call for."""
    if a.ndim == 2 and a.dtype == np.uint8:
        return Image.fromarray(a)
    if a.ndim == 2 and a.dtype == np.uint16:
        return Image.frombytes("I;16", (a.shape[1], a.shape[0]), a.astype("<u2").tobytes())
    if a.ndim == 2 and a.dtype == np.float32:
        return Image.frombytes("F", (a.shape[1], a.shape[0]), a.astype("<f4").tobytes())
    if a.ndim == 3 and a.dtype == np.uint8 and a.shape[-1] in (3, 4):
        return Image.fromarray(a)
    raise ValueError(f"no Pillow mode for an array of shape {a.shape} and dtype {a.dtype}")


def truncate(path, nbytes: int) -> Path:
    """Cut a file to its first `nbytes` bytes (negative: drop the last -nbytes bytes)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(nbytes if nbytes >= 0 else size + nbytes)
    return path


def dicom_without_pixels(path, kind="SR") -> Path:
    """A valid DICOM Part 10 file with no pixel data: a Basic Text SR ("SR") or an RT plan ("RTPLAN")."""
    path = Path(path)
    sop_class, modality = {"SR": (_BASIC_TEXT_SR, "SR"), "RTPLAN": (_RT_PLAN, "RTPLAN")}[kind]
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_uid, ExplicitVRLittleEndian)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = modality
    ds.PatientID = "P1"
    if kind == "SR":
        ds.ValueType = "CONTAINER"
        ds.ContinuityOfContent = "SEPARATE"
        ds.CompletionFlag = "COMPLETE"
        ds.VerificationFlag = "UNVERIFIED"
    else:
        ds.RTPlanLabel = "PLAN1"
        ds.RTPlanGeometry = "PATIENT"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def dicomdir(path) -> Path:
    """A minimal DICOMDIR-like Part 10 file: Media Storage Directory Storage, no records, no pixel data."""
    path = Path(path)
    ds = Dataset()
    ds.file_meta = _file_meta(MediaStorageDirectoryStorage, generate_uid(), ExplicitVRLittleEndian)
    ds.FileSetID = "FILESET1"
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    ds.DirectoryRecordSequence = Sequence()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def declared_larger(path, *, rows=2048, cols=2048) -> Path:
    """A valid uncompressed DICOM whose Rows x Columns (uint16) claim far more than its 32x32 PixelData holds."""
    path = write_dicom(path, np.arange(32 * 32, dtype=np.uint16).reshape(32, 32))
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = rows, cols
    ds.save_as(path, enforce_file_format=True)
    return path


def unsupported_syntax(path, transfer_syntax=MPEG2) -> Path:
    """A DICOM with encapsulated pixel data under a transfer syntax no installed plugin decodes (MPEG2)."""
    path = Path(path)
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(_SC_MULTIFRAME_COLOR, sop_uid, transfer_syntax)
    ds.SOPClassUID, ds.SOPInstanceUID = _SC_MULTIFRAME_COLOR, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "XC", "P1"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_PARTIAL_420", 0
    ds.Rows, ds.Columns, ds.NumberOfFrames = 32, 32, 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    # NB: not a real MPEG2 stream; what matters is that no decoder claims the syntax.
    fragment = b"\x00\x00\x01\xb3" + bytes(252)
    ds.add(DataElement(_PIXEL_DATA, "OB", encapsulate([fragment]), is_undefined_length=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _element_header(tag: int, vr: str, length: int) -> bytes:
    """An explicit VR little endian header of a 4-byte-length element (OB, OW, UN, ...)."""
    return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, length)


def deflate_bomb(path, mb: int) -> Path:
    """A DeflatedExplicitVRLittleEndian DICOM, small on disk, whose dataset inflates to more than `mb` MiB.

    Its declared image is small (32x32 uint16): the bulk is a private OB element of zeros before the pixels,
    so only a reader that bounds inflation, not one that checks Rows x Columns, stops it. Never read it whole.
    """
    path = Path(path)
    sop_uid = generate_uid()
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = _SC_IMAGE, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "OT", "P1"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = 32, 32
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.add_new(0x00090010, "LO", "BOMB")
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_dataset(head, ds)
    bulk = (mb + 1) * 2**20
    meta_bytes = DicomBytesIO()
    meta_bytes.write(bytes(128) + b"DICM")
    write_file_meta_info(meta_bytes, _file_meta(_SC_IMAGE, sop_uid, DeflatedExplicitVRLittleEndian))
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(meta_bytes.getvalue())
        f.write(compressor.compress(head.getvalue() + _element_header(0x00091010, "OB", bulk)))
        zeros = bytes(2**20)
        for _ in range(mb + 1):
            f.write(compressor.compress(zeros))
        f.write(compressor.compress(_element_header(_PIXEL_DATA, "OW", 32 * 32 * 2) + bytes(32 * 32 * 2)))
        tail = compressor.flush()
        f.write(tail + (b"\0" if (f.tell() + len(tail)) % 2 else b""))
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(path, side: int = 30000, *, bits: int = 1) -> Path:
    """A PNG of side x side zeros: 900 Mpixel by default, small on disk.

    ``bits=1``: a complete, valid 1-bit grayscale PNG (about 110 KB), which decodes to side² pixels.
    ``bits=8``: an 8-bit grayscale header with only the first 1024 rows of data (a few KB): its declared size is
    huge, and a decoder that ignores the declaration runs out of data.
    """
    path = Path(path)
    row = bytes(1 + (side * bits + 7) // 8)  # filter byte 0, then the packed samples
    written = side if bits == 1 else min(side, 1024)
    compressor = zlib.compressobj(9)
    idat = bytearray()
    for start in range(0, written, 1024):
        idat += compressor.compress(row * min(1024, written - start))
    idat += compressor.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, bits, 0, 0, 0, 0)))
        f.write(_png_chunk(b"IDAT", bytes(idat)))
        f.write(_png_chunk(b"IEND", b""))
    return path
