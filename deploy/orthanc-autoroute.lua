-- Orthanc auto-routing for pacs-triage (mounted by deploy/compose.yaml, listed in orthanc.json).
--
-- When a study has been quiet for StableAge seconds, send pacs-triage every instance of it that
-- (a) pacs-triage did not create (its SR and SEG come back into the same study) and
-- (b) was not forwarded before. Without (a) and (b) each report would make the study "stable"
-- again and send it round and round. pacs-triage ignores its own objects and identical copies
-- anyway (they never become an analysis input), but the network would not.
--
-- Our objects are recognised by where they came from (the AE title of the TRIAGE_MODALITY entry
-- of DicomModalities, read from Orthanc's own configuration, so it is written in one place) and
-- by the Manufacturer pacs-triage writes into every object it creates. Forwarded instances are
-- marked with the user metadata ForwardedToTriage.

TRIAGE_MODALITY = 'pacs-triage'          -- the key in DicomModalities
TRIAGE_MANUFACTURER = 'pacs-triage project'  -- Manufacturer of every pacs-triage object (pipeline/uids.py)

function TriageAet()
  local modality = ParseJson(RestApiGet('/modalities/' .. TRIAGE_MODALITY .. '/configuration'))
  return modality['AET']
end

function IsOurs(instanceId, meta, triageAet)
  if meta['RemoteAET'] == triageAet then
    return true
  end
  local tags = ParseJson(RestApiGet('/instances/' .. instanceId .. '/simplified-tags'))
  return tags['Manufacturer'] == TRIAGE_MANUFACTURER
end

function OnStableStudy(studyId, tags, metadata)
  local triageAet = TriageAet()
  local pending = {}
  for _, instance in pairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/instances'))) do
    local meta = ParseJson(RestApiGet('/instances/' .. instance['ID'] .. '/metadata?expand'))
    if meta['ForwardedToTriage'] == nil and not IsOurs(instance['ID'], meta, triageAet) then
      table.insert(pending, instance['ID'])
    end
  end
  print('pacs-triage: study ' .. studyId .. ' stable, forwarding ' .. #pending .. ' instance(s)')
  if #pending == 0 then
    return
  end
  -- Synchronous: mark the instances only once pacs-triage acknowledged every one of them.
  RestApiPost('/modalities/' .. TRIAGE_MODALITY .. '/store',
              DumpJson({ Resources = pending, Synchronous = true }, true))
  for _, id in pairs(pending) do
    RestApiPut('/instances/' .. id .. '/metadata/ForwardedToTriage', 'yes')
  end
end
