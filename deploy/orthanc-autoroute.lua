-- Orthanc auto-routing for pacs-triage (mounted by deploy/compose.yaml, listed in orthanc.json).
--
-- When a study has been quiet for StableAge seconds, send pacs-triage every instance of it that
-- (a) did not come from pacs-triage itself (its SR and SEG come back into the same study) and
-- (b) was not forwarded before. Without (a) and (b) each report would make the study "stable"
-- again and send it round and round; pacs-triage would ignore the identical copies, but the
-- network would not. Forwarded instances are marked with the user metadata ForwardedToTriage.

TRIAGE_MODALITY = 'pacs-triage'  -- the key in DicomModalities
TRIAGE_AET = 'PACS_TRIAGE'       -- the calling AE title pacs-triage sends its results with

function OnStableStudy(studyId, tags, metadata)
  local pending = {}
  for _, instance in pairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/instances'))) do
    local meta = ParseJson(RestApiGet('/instances/' .. instance['ID'] .. '/metadata?expand'))
    if meta['RemoteAET'] ~= TRIAGE_AET and meta['ForwardedToTriage'] == nil then
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
