"""What a DICOM row says of its file's header: the keys every row carries (and a tag's column name), the attributes
that identify a patient (a pseudonymised job's spec may not allow-list them, job/config.py; the summary flags them
otherwise), and the UIDs a pseudonymised job writes as tokens (pseudonyms.py)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from pipeline.job.config import DicomConfig

# Written for every DICOM row: the study, series and instance they belong to, and the modality. None names anyone.
KEY_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality")

# Attributes DICOM PS3.15's Basic Application Confidentiality Profile removes or replaces that a job is likely
# to ask for: people, identifiers, dates and times, places, institutions, devices' serials, free text. Writing
# one takes an explicit allow-list, and the summary flags it.
IDENTIFYING = frozenset("""
    PatientName PatientID IssuerOfPatientID OtherPatientIDs OtherPatientNames PatientBirthName PatientBirthDate
    PatientBirthTime PatientSex PatientAge PatientSize PatientWeight PatientAddress PatientTelephoneNumbers
    PatientMotherBirthName MilitaryRank BranchOfService MedicalRecordLocator EthnicGroup Occupation
    PatientComments AdditionalPatientHistory PatientReligiousPreference ResponsiblePerson CountryOfResidence
    RegionOfResidence AccessionNumber StudyID StudyDate StudyTime SeriesDate SeriesTime AcquisitionDate
    AcquisitionTime AcquisitionDateTime ContentDate ContentTime InstanceCreationDate InstanceCreationTime
    InstitutionName InstitutionAddress InstitutionalDepartmentName StationName DeviceSerialNumber
    ReferringPhysicianName ReferringPhysicianAddress ReferringPhysicianTelephoneNumbers PerformingPhysicianName
    NameOfPhysiciansReadingStudy OperatorsName PhysiciansOfRecord RequestingPhysician ScheduledPerformingPhysicianName
    StudyDescription SeriesDescription ImageComments RequestedProcedureDescription PerformedProcedureStepDescription
    ProtocolName DerivationDescription AdmittingDiagnosesDescription ImageComments TextValue PersonName
    OtherPatientIDsSequence FrameComments InterpretationText ReasonForStudy RequestAttributesSequence
""".split())


def column_name(keyword: str) -> str:
    """A DICOM keyword as a column name: SOPInstanceUID -> sop_instance_uid."""
    return re.sub(r"([a-z\d])([A-Z])", r"\1_\2", re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", keyword)).lower()


def identifying(keywords: Iterable[str]) -> list[str]:
    """Those of `keywords` that identify a patient, in their order."""
    return [k for k in keywords if k in IDENTIFYING]


def instance_uid_tags(keywords: Iterable[str]) -> list[str]:
    """The UID-valued keywords among `keywords` that a pseudonymised job writes as tokens: every UI attribute but
    the standard's own constants (SOP class, transfer syntax, coding scheme), which identify no one."""
    from pydicom.datadict import dictionary_VR, keyword_dict

    return [k for k in keywords if dictionary_VR(keyword_dict[k]) == "UI"
            and not k.endswith(("ClassUID", "TransferSyntaxUID", "CodingSchemeUID"))]


def written_tags(dicom: DicomConfig | None) -> list[str] | None:
    """The DICOM attributes a DICOM job's rows carry: the keys, the modality, and what the job allow-listed."""
    return list(KEY_TAGS) + list(dicom.include_tags) if dicom is not None else None


def identifying_note(tags: list[str]) -> str:
    """The summary's word on `tags` (`written_tags`): which identify a patient, or that none does."""
    flagged = identifying(tags)
    return f"  (patient-identifying, allow-listed by the job: {', '.join(flagged)})" if flagged else \
        "  (no patient-identifying attributes)"
