#!/usr/bin/env bash
# Make sure Debian's DICOM tools are there for the DICOM tests: dicom3tools (dciodvfy) and dcmtk
# (dcmdump, dcmftest) validate the exported SEG; Orthanc with its DICOMweb plugin is the PACS of
# the DICOMweb round trip. Installs them only when running as root with apt-get (CI, fresh dev
# machines here); otherwise says what the tests need. Services are not started (the tests start
# their own Orthanc on a free loopback port).
set -u
if command -v dciodvfy >/dev/null 2>&1 && command -v dcmdump >/dev/null 2>&1 \
  && [ -x /usr/sbin/Orthanc ] && dpkg -s orthanc-dicomweb >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing Debian's dicom3tools, dcmtk, orthanc and orthanc-dicomweb for the DICOM tests..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    dicom3tools dcmtk orthanc orthanc-dicomweb >/dev/null
  exit $?
fi
echo "NOTE: Debian's DICOM tools are missing; the SEG validation and Orthanc tests will be" \
  "skipped (apt-get install dicom3tools dcmtk orthanc orthanc-dicomweb)."
