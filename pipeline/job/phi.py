"""DICOM attributes that identify a patient: a job's spec may not ask for them unless it means to (config.py), and
a pseudonymised job never writes them."""

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
