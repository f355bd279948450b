"""Reading and writing files: CT images (MetaImage, NIfTI, DICOM) and atomic writes."""
