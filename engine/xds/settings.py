"""What the DMP request builder needs besides the message: the VIHF and XDS settings of a site.

The connector embeds these models in the ``dmp`` destination of ``routes.yaml``: they hold no secret
(key and certificate paths, passwords and TLS settings belong to the connector). Every default is
the value of the public guide quoted on the field; where the guide and its examples differ, the
field is a setting whose default is the guide's value, and its description says so.

Guides quoted:

* CI-SIS "Transmission de documents CDA-R2 en HL7 v2" v2.1, ``mapping.md``: « Mapping VIHF pour le
  DMP », « Mapping XDS » (« Lot de soumission », « Fiche »), « Exemple d'un VIHF avec automate »;
  ``profils-messages.md`` (the MetaDMPMSS OBX);
* the DMP's own example request (DMP/DRIMbox test data, « publication.xml »), accepted by the DMP;
* IHE ITI TF-3 §4.2.3 (XDS metadata), IHE ITI-57 (Update Document Set).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: XML-DSig algorithm names accepted for the VIHF and the XAdES signature document
SignatureAlgorithm = Literal["rsa-sha256", "rsa-sha384", "rsa-sha512", "ecdsa-sha256",
                             "ecdsa-sha384", "ecdsa-sha512"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Coded(_Model):
    """A coded value of the XDS metadata: code, its coding scheme (OID), its display name."""

    code: str
    scheme: str
    display: str | None = None


class VihfSettings(_Model):
    """The VIHF SAML 2 assertion (mapping.md « Mapping VIHF pour le DMP »)."""

    version: str = Field(
        "4.0", description="VIHF_Version. The guide's table says the constant « 4.0 »; both examples "
        "(the guide's « Exemple d'un VIHF avec automate » and the DMP's publication.xml) send 3.0. "
        "Default: the guide's table; set 3.0 if the DMP environment asks for it.")
    signature_algorithm: SignatureAlgorithm = Field(
        "rsa-sha256", description="SignatureMethod of the assertion's enveloped XML-DSig signature. "
        "The guide's example signs rsa-sha256 (with exc-c14n); the DMP's publication.xml rsa-sha1, "
        "which is no longer accepted for new signatures: default rsa-sha256.")
    digest_algorithm: Literal["sha256", "sha384", "sha512"] = Field(
        "sha256", description="DigestMethod of the signature's reference (guide example: sha256).")
    authn_context: str = Field(
        "urn:oasis:names:tc:SAML:2.0:ac:classes:unspecified",
        description="AuthnContextClassRef: « Paramétrage dans la PFI en fonction du flux » (mapping.md); "
        "the guide's automate example uses « unspecified », the DMP example « TLSClient ».")
    authentication_mode: str = Field(
        "INDIRECTE", description="Authentification_Mode: constant « INDIRECTE » (mapping.md).")
    role: Coded = Field(
        Coded(code="AUTOMATE", scheme="1.2.250.1.213.1.1.4.6", display="AUTOMATE"),
        description="First urn:oasis:names:tc:xacml:2.0:subject:role (JDV_J65): « Valeur AUTOMATE "
        "quand les autres cas ne sont pas possibles » (mapping.md); a PFI acting as an automated "
        "flow sends AUTOMATE, as in « Exemple d'un VIHF avec automate ».")
    subject_id: str | None = Field(
        None, description="urn:oasis:names:tc:xspa:1.0:subject:subject-id for an automated flow: "
        "« Nom du logiciel, Nom du modèle » (mapping.md). None: PRT-5.2 and PRT-5.3 of the SB PRT, "
        "then « <lps_name>, <lps_version> ».")
    structure_id: str | None = Field(
        None, description="Identifiant_Structure (Struct_IdNat). None: PRT-8.10 of the SB PRT "
        "(mapping.md). Set it when the sender does not fill PRT-8.10.")
    secteur_activite: Coded = Field(
        ..., description="Secteur_Activite, « Fourni par le LPS ... Paramétrage dans la PFI » "
        "(mapping.md), a code of JDV_J61 HealthcareFacilityTypeCode-DMP, e.g. SA07 / "
        "1.2.250.1.71.4.2.4; sent as « code^scheme ».")
    purpose_of_use: Coded = Field(
        Coded(code="normal", scheme="1.2.250.1.213.1.1.4.248", display="Accès normal"),
        description="urn:oasis:names:tc:xspa:1.0:subject:purposeofuse: « code=normal : pour un "
        "accès normal » (mapping.md; codeSystemName « mode acces VIHF 1.0 »).")
    resource_urn: str = Field("urn:dmp", description="Ressource_URN: constant « urn:dmp » (mapping.md).")
    lps_id: str | None = Field(None, description="LPS_ID: optional (mapping.md).")
    lps_name: str = Field(..., description="LPS_Nom: name of the software issuing the VIHF.")
    lps_version: str = Field(..., description="LPS_Version: its version number.")
    lps_homologation_id: str = Field(
        ..., description="LPS_ID_HOMOLOGATION_DMP: the DMP homologation number of the software.")
    secret_connection: bool = Field(
        True, description="« confidentiality-code: Obligatoire si la fonctionnalité est activée et si "
        "demande de connexion secrète au DMP » (mapping.md): when true, a message whose "
        "CONNEXION_SECRETE flag is Y (profils-messages.md « Connexion Secrète ») adds the "
        "urn:oasis:names:tc:xspa:1.0:resource:patient:hl7:confidentiality-code attribute.")
    secret_connection_code: Coded = Field(
        Coded(code="INVISIBLE_PATIENT", scheme="1.2.250.1.213.1.1.4.13",
              display="Document non visible par le patient"),
        description="Value of that attribute. The transmission guide does not give it; the DMP "
        "integration guide (« Service DMP intégré aux LPS », not public) does: the default is the "
        "TRE_A07 visibility code used for a secret connection [to confirm with the DMP kit].")
    validity: int = Field(
        0, ge=0, description="Seconds of Conditions/@NotOnOrAfter after the issue instant "
        "(« Facultatif »); 0 leaves Conditions out. AudienceRestriction is never sent "
        "(« Ne pas renseigner »).")


class XdsSettings(_Model):
    """The XDS metadata and the SOAP header (mapping.md « Mapping XDS »; the DMP example)."""

    endpoint: str = Field(
        ..., description="wsa:To, the DMP repository service URL (DMP example: "
        "https://<env>.lps2.dmp.gouv.fr/si-dmp-server/v2/services/repository).")
    registry_endpoint: str | None = Field(
        None, description="wsa:To of the ITI-57 requests (the DMP's registry service). None: "
        "``endpoint`` with its last path segment replaced by « registry ».")
    source_id: str = Field(
        ..., description="XDSSubmissionSet.sourceId: « identifiant unique global du système émetteur "
        "du lot de soumission » (mapping.md « Lot de soumission »), an OID of the site.")
    language_default: str = Field("fr-FR", description="languageCode when the CDA has none.")
    healthcare_facility_type: Coded | None = Field(
        None, description="healthcareFacilityTypeCode when the CDA has no componentOf/"
        "encompassingEncounter/location/healthCareFacility/code (JDV_J61; scheme 1.2.250.1.71.4.2.4).")
    practice_setting: Coded | None = Field(
        None, description="practiceSettingCode when the CDA has no standardIndustryClassCode on "
        "the service event performer's (mapping.md) or the author's organisation (JDV_J04; "
        "scheme 1.2.250.1.213.1.1.4.9).")
    content_type_scheme: str = Field(
        "1.2.250.1.213.2.2", description="Coding scheme of contentTypeCode (JDV_J59), as in the DMP "
        "example (« 04 Hospitalisation de jour », 1.2.250.1.213.2.2).")
    content_type_by_patient_class: dict[str, str] = Field(
        {"I": "03", "O": "07", "R": "19", "N": "97", "E": "07"},
        description="contentTypeCode from PV1-2 (mapping.md « Lot de soumission »: « I => 03; "
        "O => 07; R => 19; N => 97; E => 07 »).")
    content_type_default: str = Field(
        "07", description="contentTypeCode when neither PV1-2 nor the encounter code gives one.")
    class_codes: dict[str, Coded] = Field(
        {"18748-4": Coded(code="31", scheme="1.2.250.1.213.1.1.4.1", display="Imagerie médicale"),
         "11502-2": Coded(code="10", scheme="1.2.250.1.213.1.1.4.1", display="Compte rendu")},
        description="classCode by CDA code (typeCode), the ASS_X04 CorrespondanceType-Classe rows "
        "the engine uses (JDV_J57; scheme TRE_A03 1.2.250.1.213.1.1.4.1). 18748-4 -> 31 is the "
        "imaging row (the DMP example's class for imaging); add rows for other document types.")
    format_codes: dict[str, Coded] = Field(
        {"1.3.6.1.4.1.19376.1.3.3": Coded(code="urn:ihe:lab:xd-lab:2008",
                                          scheme="1.3.6.1.4.1.19376.1.2.3", display="CR de biologie")},
        description="formatCode of a CDA N3 by templateId (ASS_A11 CorresModeleCDA-XdsFormatCode); "
        "a N1 is always urn:ihe:iti:xds-sd:pdf:2008 (mapping.md « Fiche », formatCode).")
    mask_classifications: bool = Field(
        True, description="Add one confidentialityCode per active mask (MASQUE_PS, INVISIBLE_PATIENT, "
        "INVISIBLE_REPRESENTANTS_LEGAUX; TRE_A07 1.2.250.1.213.1.1.4.13) after the CDA's own "
        "(mapping.md « Fiche », confidentialityCode: « les autres occurences ... MetaDMPMSS »).")
    sign_submission: bool = Field(
        True, description="Add the signature document entry (XAdES, IHE DSG style) with its HasMember "
        "and « signs » associations, as in the DMP example.")
    signature_algorithm: SignatureAlgorithm = Field(
        "rsa-sha256", description="SignatureMethod of that signature document (the DMP example: "
        "rsa-sha1, refused for new signatures).")
    submission_title: str | None = Field(None, description="Optional submission set title.")


class DmpRequestSettings(_Model):
    """Both, as the ``dmp`` destination of routes.yaml carries them."""

    vihf: VihfSettings
    xds: XdsSettings
