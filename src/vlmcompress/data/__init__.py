"""Data: procedural scenes, COCO-format I/O, paper-profile downloads, image folders."""
from vlmcompress.data.records import ImageRecord, ObjectAnn, Question, RefExpr, load_split

__all__ = ["ImageRecord", "ObjectAnn", "Question", "RefExpr", "load_split"]
