"""Small, fast FHIR R4 helpers: resource types, structural checks, canonical hashing,
references, patient and clinical-date extraction.

Full validation against the R4 structure definitions (fhir.resources, R4B models) runs
about 400 resources a second; this module's checks run at tens of thousands a second
and catch what real-world files get wrong. ``strict_problems`` adds the full check.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import orjson

from shlhost.errors import BadRequest

R4_RESOURCE_TYPES = frozenset(
    """Account ActivityDefinition AdverseEvent AllergyIntolerance Appointment AppointmentResponse
    AuditEvent Basic Binary BiologicallyDerivedProduct BodyStructure Bundle CapabilityStatement
    CarePlan CareTeam CatalogEntry ChargeItem ChargeItemDefinition Claim ClaimResponse
    ClinicalImpression CodeSystem Communication CommunicationRequest CompartmentDefinition
    Composition ConceptMap Condition Consent Contract Coverage CoverageEligibilityRequest
    CoverageEligibilityResponse DetectedIssue Device DeviceDefinition DeviceMetric DeviceRequest
    DeviceUseStatement DiagnosticReport DocumentManifest DocumentReference EffectEvidenceSynthesis
    Encounter Endpoint EnrollmentRequest EnrollmentResponse EpisodeOfCare EventDefinition Evidence
    EvidenceVariable ExampleScenario ExplanationOfBenefit FamilyMemberHistory Flag Goal
    GraphDefinition Group GuidanceResponse HealthcareService ImagingStudy Immunization
    ImmunizationEvaluation ImmunizationRecommendation ImplementationGuide InsurancePlan Invoice
    Library Linkage List Location Measure MeasureReport Media Medication MedicationAdministration
    MedicationDispense MedicationKnowledge MedicationRequest MedicationStatement MedicinalProduct
    MedicinalProductAuthorization MedicinalProductContraindication MedicinalProductIndication
    MedicinalProductIngredient MedicinalProductInteraction MedicinalProductManufactured
    MedicinalProductPackaged MedicinalProductPharmaceutical MedicinalProductUndesirableEffect
    MessageDefinition MessageHeader MolecularSequence NamingSystem NutritionOrder Observation
    ObservationDefinition OperationDefinition OperationOutcome Organization OrganizationAffiliation
    Parameters Patient PaymentNotice PaymentReconciliation Person PlanDefinition Practitioner
    PractitionerRole Procedure Provenance Questionnaire QuestionnaireResponse RelatedPerson
    RequestGroup ResearchDefinition ResearchElementDefinition ResearchStudy ResearchSubject
    RiskAssessment RiskEvidenceSynthesis Schedule SearchParameter ServiceRequest Slot Specimen
    SpecimenDefinition StructureDefinition StructureMap Subscription Substance
    SubstanceNucleicAcid SubstancePolymer SubstanceProtein SubstanceReferenceInformation
    SubstanceSourceMaterial SubstanceSpecification SupplyDelivery SupplyRequest Task
    TerminologyCapabilities TestReport TestScript ValueSet VerificationResult
    VisionPrescription""".split()  # noqa: SIM905 - a word list reads better than 146 quoted names
)

ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")
SERVER_META = ("versionId", "lastUpdated")

# Elements that STU3 had and R4 renamed, retyped or dropped: kept in lenient mode, reported.
STU3_LEFTOVERS: dict[str, tuple[str, ...]] = {
    "Immunization": ("notDone", "date"),
    "MedicationStatement": ("taken",),
    "MedicationRequest": ("context",),
    "Procedure": ("notDone", "notDoneReason", "context"),
    "Observation": ("context",),
    "DiagnosticReport": ("context", "codedDiagnosis"),
    "AllergyIntolerance": ("assertedDate",),
    "Condition": ("assertedDate",),
}
STU3_STRING_CODES: dict[str, tuple[str, ...]] = {
    "Condition": ("clinicalStatus", "verificationStatus"),
    "AllergyIntolerance": ("clinicalStatus", "verificationStatus"),
}

# Where each resource keeps its clinical date, most specific first.
_DATE_PATHS = (
    "effectiveDateTime",
    "effectiveInstant",
    "effectivePeriod.start",
    "onsetDateTime",
    "onsetPeriod.start",
    "performedDateTime",
    "performedPeriod.start",
    "occurrenceDateTime",
    "occurrencePeriod.start",
    "authoredOn",
    "recordedDate",
    "issued",
    "dateAsserted",
    "date",
    "period.start",
    "billablePeriod.start",
    "created",
    "recorded",
    "sent",
    "start",
    "whenHandedOver",
    "dateWritten",
)
_SUBJECT_KEYS = ("subject", "patient", "beneficiary")


EXPORT_COVER_TAG = {"system": "https://shlhost.dev/fhir/tags", "code": "export-cover"}


def is_export_cover(resource: dict[str, Any]) -> bool:
    meta = resource.get("meta")
    tags = meta.get("tag") if isinstance(meta, dict) else None
    return isinstance(tags, list) and any(
        isinstance(t, dict)
        and t.get("system") == EXPORT_COVER_TAG["system"]
        and t.get("code") == "export-cover"
        for t in tags
    )


def parse_instant(text: str, name: str = "_since") -> datetime:
    """An ISO 8601 instant with a time zone, or a clear 400 naming the parameter."""
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(
            f"{name} must be an instant such as 2024-05-01T00:00:00Z", code="invalid_since"
        ) from None
    if when.tzinfo is None:
        raise BadRequest(f"{name} needs a time zone (e.g. Z)", code="invalid_since")
    return when


def strip_server_meta(resource: dict[str, Any]) -> dict[str, Any]:
    """The resource without the meta fields a server sets (versionId, lastUpdated)."""
    meta = resource.get("meta")
    if not isinstance(meta, dict) or not any(k in meta for k in SERVER_META):
        return resource
    kept = {k: v for k, v in meta.items() if k not in SERVER_META}
    out = {k: v for k, v in resource.items() if k != "meta"}
    if kept:
        out["meta"] = kept
    return out


def content_hash(resource: dict[str, Any], *, clinical_only: bool = False) -> str:
    """SHA-256 of the canonical JSON without id and meta (and narrative, if clinical_only)."""
    skip = ("id", "meta", "text") if clinical_only else ("id", "meta")
    if not any(k in resource for k in skip):
        return hashlib.sha256(orjson.dumps(resource, option=orjson.OPT_SORT_KEYS)).hexdigest()
    body = {k: v for k, v in resource.items() if k not in skip}
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def derived_id(resource: dict[str, Any]) -> str:
    """A stable id for a resource that came without one: the same content, the same id."""
    return "h" + content_hash(resource)[:40]


def _ref_id(ref: Any, rtype: str) -> str | None:
    if isinstance(ref, dict):
        ref = ref.get("reference")
    if isinstance(ref, str) and ref.startswith(rtype + "/"):
        rest = ref[len(rtype) + 1 :].split("/", 1)[0]
        return rest if ID_RE.fullmatch(rest) else None
    return None


def patient_of(resource: dict[str, Any]) -> str | None:
    """The id of the Patient a resource is about (its own id for a Patient)."""
    if resource.get("resourceType") == "Patient":
        rid = resource.get("id")
        return rid if isinstance(rid, str) else None
    for key in _SUBJECT_KEYS:
        pid = _ref_id(resource.get(key), "Patient")
        if pid:
            return pid
    return None


def _get_path(resource: dict[str, Any], path: str) -> Any:
    value: Any = resource
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def clinical_date(resource: dict[str, Any]) -> str | None:
    """The date a resource is about, as the ISO 8601 text it carries (or None)."""
    for path in _DATE_PATHS:
        value = _get_path(resource, path)
        if isinstance(value, str) and value[:4].isdigit():
            return value[:35]
    return None


def references(obj: Any) -> Iterator[str]:
    """Every ``reference`` string anywhere in a resource."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "reference" and isinstance(value, str):
                yield value
            elif isinstance(value, (dict, list)):
                yield from references(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from references(item)


def rewrite_references(obj: Any, fix: Callable[[str], str | None]) -> Any:
    """Copy of ``obj`` with every reference ``r`` replaced by ``fix(r)`` where that is not None."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if key == "reference" and isinstance(value, str):
                new = fix(value)
                out[key] = value if new is None else new
            elif isinstance(value, (dict, list)):
                out[key] = rewrite_references(value, fix)
            else:
                out[key] = value
        return out
    if isinstance(obj, list):
        return [rewrite_references(item, fix) for item in obj]
    return obj


def identifiers(resource: dict[str, Any]) -> list[tuple[str, str]]:
    """(system, value) pairs of a resource's business identifiers."""
    found = resource.get("identifier")
    if isinstance(found, dict):
        found = [found]
    out = []
    for ident in found or []:
        if isinstance(ident, dict):
            system, value = ident.get("system"), ident.get("value")
            if isinstance(value, str) and value and len(value) <= 255:
                out.append(
                    (system if isinstance(system, str) and len(system) <= 255 else "", value)
                )
    return out


def light_problems(resource: dict[str, Any]) -> list[tuple[str, str]]:
    """Fast structural checks: (severity, message) pairs. An ``error`` rejects the resource."""
    rtype = resource["resourceType"]
    if rtype not in R4_RESOURCE_TYPES:
        return [("error", f"{rtype} is not a FHIR R4 resource type")]
    problems: list[tuple[str, str]] = []
    for key, value in resource.items():
        # Empty: None, "", [] or {} (but not False or 0, which are values).
        if not value and value is not False and value != 0:
            problems.append(("warning", f"{rtype}.{key} is empty (FHIR JSON forbids empty values)"))
    meta = resource.get("meta")
    if meta is not None and not isinstance(meta, dict):
        problems.append(("error", f"{rtype}.meta must be an object"))
    for key in STU3_LEFTOVERS.get(rtype, ()):
        if key in resource:
            problems.append(("warning", f"{rtype}.{key} is an STU3 element, not R4"))
    for key in STU3_STRING_CODES.get(rtype, ()):
        if isinstance(resource.get(key), str):
            problems.append(
                ("warning", f"{rtype}.{key} is an STU3 code string; R4 wants a CodeableConcept")
            )
    return problems


def strict_problems(resource: dict[str, Any]) -> list[str]:
    """Full structural validation with fhir.resources' R4B models (slow; strict mode only)."""
    from fhir.resources.R4B import get_fhir_model_class
    from pydantic import ValidationError

    try:
        model = get_fhir_model_class(resource["resourceType"])
    except KeyError:
        return [f"{resource['resourceType']} is not a FHIR resource type"]
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        return [
            f"{'.'.join(str(p) for p in err['loc']) or resource['resourceType']}: {err['msg']}"
            for err in exc.errors()[:20]
        ]
    return []
